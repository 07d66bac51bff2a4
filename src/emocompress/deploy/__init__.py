"""Shipping a model: the artifact folder format and its validating reader, and the server. Torch-free."""
