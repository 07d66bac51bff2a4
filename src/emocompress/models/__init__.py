"""Networks: the classifier, students, pretrained loading, structure, checkpoints."""
