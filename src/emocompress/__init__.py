"""emocompress: fine-tune and compress transformer emotion classifiers with PyTorch Lightning.

Importing the package imports nothing heavy: ``emocompress --help`` answers before torch loads, and
``python -m emocompress.deploy.serve`` runs with onnxruntime alone. The modules that build or load models
(``models.classifier``, ``models.loading``, ``compression.export``) import ``emocompress.models.students``, which
registers ``SmallEncoderClassifier`` with transformers' Auto classes.
"""

__version__ = "0.1.0"
