"""emocompress: fine-tune and compress transformer emotion classifiers with PyTorch Lightning."""

from emocompress import students  # noqa: F401  (registers RecurrentClassifier with transformers' Auto classes)

__version__ = "0.1.0"
