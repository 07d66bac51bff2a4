import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

from emocompress.models import structure
from emocompress.models.classifier import EmotionClassifier
from emocompress.models.first_token import first_token_only, supported

SIZES = {"bert": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
         "roberta": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1),
         "distilbert": dict(dim=16, n_layers=2, n_heads=4, hidden_dim=32, dropout=0.0, attention_dropout=0.0,
                            seq_classif_dropout=0.0)}


def _tiny(model_type: str, attention: str = "sdpa", auto=AutoModelForSequenceClassification):
    config = AutoConfig.for_model(model_type, vocab_size=60, max_position_embeddings=64, num_labels=3,
                                  **SIZES[model_type])
    torch.manual_seed(0)
    return auto.from_config(config, attn_implementation=attention)


def _batch(vocab_size: int = 60):
    """Right-padded rows of 12, 7 and 3 real tokens, so the mask matters."""
    ids = torch.randint(5, vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}


def _last_layer_rows(model, batch, enabled: bool):
    """Logits, and the number of token rows the last layer output."""
    rows = []
    layer = model.base_model.get_submodule(structure.family(model).layers)[-1]
    hook = layer.register_forward_hook(lambda module, args, out: rows.append(out.shape[1]))
    with first_token_only(model, enabled):
        logits = model(**batch).logits
    hook.remove()
    return logits, rows[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_first_token_only_gives_the_full_forwards_logits_and_gradients(model_type, attention):
    model, batch = _tiny(model_type, attention).train(), _batch()  # train mode: no dropout configured
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        logits, rows = _last_layer_rows(model, batch, enabled)
        assert rows == (1 if enabled else 12)  # it really computed one token, not the full layer
        logits.square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    full, trimmed = grads
    assert full.keys() == trimmed.keys() and len(full) == len(list(model.parameters()))
    for name in full:
        torch.testing.assert_close(trimmed[name], full[name], atol=1e-5, rtol=1e-4, msg=name)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_last_layer_rows(model, batch, True)[0], _last_layer_rows(model, batch, False)[0],
                                   atol=1e-5, rtol=1e-4)


def test_first_token_only_on_a_structurally_pruned_last_layer():
    model, batch = _tiny("bert").eval(), _batch()
    structure.layers(model)[-1].keep(heads=torch.tensor([0, 2]), ffn=torch.arange(20))  # 4 -> 2 heads, 32 -> 20
    with torch.no_grad():
        torch.testing.assert_close(_last_layer_rows(model, batch, True)[0], _last_layer_rows(model, batch, False)[0],
                                   atol=1e-5, rtol=1e-4)


def test_the_layer_is_restored_after_the_block_even_on_an_error():
    model = _tiny("bert")
    layer = model.bert.encoder.layer[-1]
    with pytest.raises(RuntimeError, match="boom"):
        with first_token_only(model):
            assert "forward" in vars(layer)
            raise RuntimeError("boom")
    assert "forward" not in vars(layer)
    assert model(**_batch()).logits.shape == (3, 3)


def test_models_that_read_every_token_are_not_trimmed():
    token_tagger = _tiny("bert", auto=AutoModelForTokenClassification)  # one label per token
    assert not supported(token_tagger) and not supported(torch.nn.Linear(2, 2))
    with first_token_only(token_tagger):
        assert token_tagger(**_batch()).logits.shape == (3, 12, 3)


def test_the_classifier_trims_by_default_and_can_be_told_not_to(tiny_model_dir):
    id2label = {0: "anger", 1: "joy", 2: "love"}
    outputs = {}
    for trim in (True, False):
        torch.manual_seed(0)  # the same fresh head
        module = EmotionClassifier(tiny_model_dir, id2label, trim_last_layer=trim).eval()
        batch = _batch(module.model.config.vocab_size)
        rows = []
        module.model.bert.encoder.layer[-1].register_forward_hook(lambda m, a, out: rows.append(out.shape[1]))
        with torch.no_grad():
            outputs[trim] = module(batch)
        assert rows == [1 if trim else 12]
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=1e-4)
