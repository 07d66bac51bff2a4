"""Data: reading and validating sources, the datamodule, oversampling, augmentation, student vocabularies."""
