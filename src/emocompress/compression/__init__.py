"""Making models smaller and faster: distillation, pruning, structured pruning, INT8, export."""
