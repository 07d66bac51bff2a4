"""Measuring and comparing models: ``emocompress benchmark``."""
