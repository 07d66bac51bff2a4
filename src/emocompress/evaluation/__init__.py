"""How models are judged: significance tests and intervals (numpy and scipy only)."""
