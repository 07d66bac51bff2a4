"""emocompress: fine-tune and compress transformer emotion classifiers with PyTorch Lightning."""

__version__ = "0.1.0"
