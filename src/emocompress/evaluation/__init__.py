"""How models are judged: the metrics (torchmetrics), significance tests and intervals (numpy and scipy), plots."""
