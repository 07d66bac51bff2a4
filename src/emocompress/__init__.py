"""emocompress: fine-tune and compress transformer emotion classifiers with PyTorch Lightning."""

try:
    from emocompress import students  # noqa: F401  (registers RecurrentClassifier with transformers' Auto classes)
except ModuleNotFoundError as error:
    # `python -m emocompress.serve` imports this package on a server with only onnxruntime and tokenizers;
    # there is no transformers to register with. Any other missing module is a real error.
    if error.name not in ("torch", "transformers"):
        raise

__version__ = "0.1.0"
