"""emocompress.models.freezing: what ``freeze`` turns off, what it counts, and what it refuses."""

import pytest
from transformers import AutoModelForSequenceClassification

from emocompress.models import structure
from emocompress.models.freezing import freeze, parameter_groups


def test_freeze_embeddings_and_first_layers_and_count_the_rest(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True)
    trainable = freeze(model, layers=1)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters()
                      if name.startswith(("bert.embeddings.", "bert.encoder.layer.0."))}
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # frozen parameters stay out of the optimizer's groups; biases and LayerNorm weights get no decay
    grouped = [p for group in parameter_groups(model, 0.01) for p in group["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}


def test_freeze_refuses_more_layers_than_the_model_has_and_unmapped_families(tiny_model_dir, monkeypatch):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match="model.freeze_layers is 3, but tiny has 2 layers"):
        freeze(model, layers=3, name="tiny")
    monkeypatch.setattr(structure, "_FAMILIES", {})
    with pytest.raises(ValueError, match="model.freeze_layers: .*no attention heads"):
        freeze(model, layers=1)
    assert freeze(model) < sum(p.numel() for p in model.parameters())  # the embeddings alone need no family
