"""Structured pruning: heads and FFN neurons removed, layers rebuilt smaller, and every loader rebuilding
the recorded shape."""

import copy

import pytest
import torch
from lightning.pytorch import Callback
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from emocompress.compression.structured_pruning import StructuredPruning, _remove_lowest, _taylor_scores
from emocompress.models import pretrained, structure
from emocompress.models.classifier import EmotionClassifier

# 4 heads of 4 dims per layer, 24 FFN neurons: enough units to rank.
_SHAPE = {"bert": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24},
          "roberta": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
                      "pad_token_id": 0},
          "distilbert": {"dim": 16, "n_layers": 2, "n_heads": 4, "hidden_dim": 24}}


def tiny(model_type: str, vocab_size: int = 40) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, max_position_embeddings=128, num_labels=3,
                                  **_SHAPE[model_type])
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.fixture(scope="module")
def wide_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT's tokenizer with a 4-head, 24-neuron BERT of its vocabulary."""
    out = tmp_path_factory.mktemp("wide-bert")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tiny("bert", vocab_size=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _logits(model, ids=None):
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 5, 6, 3, 0]]) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != 0).long()).logits


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_removing_units_computes_what_zeroing_their_outputs_computes(model_type):
    model = tiny(model_type)
    zeroed = copy.deepcopy(model)
    heads, ffn = torch.tensor([0, 3]), torch.tensor([1, 2, 5, 8, 20])
    for layer in structure.layers(zeroed)[:1]:  # a head / neuron contributes only through the output projection
        keep_cols = torch.zeros(4, dtype=torch.bool)
        keep_cols[heads] = True
        with torch.no_grad():
            layer.get(layer.fam.attention_out).weight[:, ~keep_cols.repeat_interleave(4)] = 0
            dropped = torch.ones(24, dtype=torch.bool)
            dropped[ffn] = False
            layer.get(layer.fam.ffn_out).weight[:, dropped] = 0
    structure.layers(model)[0].keep(heads=heads, ffn=ffn)
    structure.record(model)
    assert structure.shape(model) == [{"heads": 2, "ffn": 5}, {"heads": 4, "ffn": 24}]
    assert model.config.layer_shapes == structure.shape(model)
    torch.testing.assert_close(_logits(model), _logits(zeroed))


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_a_pruned_folder_reloads_only_through_the_project_loader(model_type, tmp_path):
    model = tiny(model_type)
    structure.layers(model)[1].keep(heads=torch.tensor([2]), ffn=torch.arange(7))
    structure.record(model)
    model.save_pretrained(tmp_path)
    pretrained.mark_saved_config(tmp_path)
    # plain transformers would rebuild the unpruned shape and re-initialise the pruned layers: it must refuse
    with pytest.raises(ValueError, match=r"load it with emocompress\.models\.pretrained\.load_model"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    loaded = pretrained.load_model(str(tmp_path))
    assert structure.shape(loaded) == structure.shape(model)
    torch.testing.assert_close(_logits(loaded), _logits(model))
    assert pretrained.load_config(str(tmp_path)).layer_shapes[1] == {"heads": 1, "ffn": 7}
    # a head for other labels starts afresh, as with from_pretrained(ignore_mismatched_sizes=True)
    relabelled, info = pretrained.load_model(str(tmp_path), num_labels=2, ignore_mismatched_sizes=True,
                                             output_loading_info=True)
    assert _logits(relabelled).shape == (2, 2) and info["mismatched_keys"]


def test_checkpoint_weights_reshape_the_model_they_load_into():
    pruned, full = tiny("bert"), tiny("bert")
    structure.layers(pruned)[0].keep(heads=torch.tensor([1, 2, 3]), ffn=torch.arange(10))
    structure.fit_to_state_dict(full, pruned.state_dict())
    full.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(_logits(full), _logits(pruned))
    assert full.config.layer_shapes[0] == {"heads": 3, "ffn": 10}
    # and back to the unpruned shape for an unpruned checkpoint
    structure.fit_to_state_dict(full, tiny("bert").state_dict())
    assert structure.shape(full) == [{"heads": 4, "ffn": 24}] * 2 and not structure.is_pruned(full.config)


def test_taylor_scores_are_output_times_gradient():
    # Summed over a unit's columns of the output projection, weight * grad is the unit's output times the
    # loss gradient at that output (Michel et al.'s head gate gradient): check it against forward hooks.
    model = tiny("bert").train()
    layer = structure.layers(model)[0]
    seen = {}

    def keep_input(name):
        def hook(module, args):
            args[0].retain_grad()
            seen[name] = args[0]
        return hook

    layer.get(layer.fam.attention_out).register_forward_pre_hook(keep_input("heads"))
    layer.get(layer.fam.ffn_out).register_forward_pre_hook(keep_input("ffn"))
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 5, 6, 3, 8]])
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    scores = _taylor_scores(model)
    heads = (seen["heads"] * seen["heads"].grad).sum((0, 1)).view(4, 4).sum(1).abs()
    ffn = (seen["ffn"] * seen["ffn"].grad).sum((0, 1)).abs()
    torch.testing.assert_close(scores["heads"][0], heads, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scores["ffn"][0], ffn, atol=1e-6, rtol=1e-4)


class _Watch(Callback):
    """Records the model's shape and checks that masked units are exactly zero after every step."""

    def __init__(self):
        self.shapes = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.shapes.append(structure.shape(pl_module.model))
        for module in pl_module.model.modules():
            if hasattr(module, "weight_mask"):
                assert torch.all(module.weight[module.weight_mask == 0] == 0)


class _SaveAt(Callback):
    """Saves a checkpoint after optimizer step ``step``, mid-training (before the callbacks' train-end work)."""

    def __init__(self, step, path, weights_only=False):
        self.step, self.path, self.weights_only = step, path, weights_only

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path, weights_only=self.weights_only)


@pytest.fixture
def fit(make_datamodule, tiny_trainer, wide_model_dir):
    """``fit(callbacks, ckpt_path=None, model_args=None, **trainer_kwargs) -> (model, trainer)``: a short CPU fit
    of the wide BERT."""
    def fit(callbacks, ckpt_path=None, model_args=None, **trainer_kwargs):
        dm = make_datamodule(model_dir=wide_model_dir, batch_size=4)
        model = EmotionClassifier(wide_model_dir, dm.id2label, lr=1e-2, **(model_args or {}))
        trainer = tiny_trainer(callbacks=callbacks, **trainer_kwargs)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, trainer

    return fit


def test_one_shot_rebuilds_the_layers_smaller_and_keeps_training(fit):
    watch = _Watch()
    callback = StructuredPruning(head_amount=0.5, ffn_amount=0.25, start_step=2)
    model, trainer = fit([callback, watch], max_steps=6)
    # 8 heads, 48 neurons in all; global ranking: counts are exact overall, layers may differ
    assert watch.shapes[0] == [{"heads": 4, "ffn": 24}] * 2  # step 0: unpruned
    final = structure.shape(model.model)
    assert sum(s["heads"] for s in final) == 4 and sum(s["ffn"] for s in final) == 36
    assert all(s["heads"] >= 1 for s in final)
    assert watch.shapes[2] == final  # rebuilt at step 2: the remaining steps ran on the smaller model
    assert model.model.config.layer_shapes == final
    # the optimizer trains the new parameters (and nothing stale): they move after the rebuild
    optimizer = trainer.optimizers[0]
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in model.model.parameters() if p.requires_grad}
    assert all(p in optimizer.state for p in model.model.parameters())


def test_frozen_layers_stay_frozen_when_rebuilt_smaller(fit):
    model, trainer = fit([StructuredPruning(head_amount=0.5, ffn_amount=0.25, start_step=2)], max_steps=4,
                         model_args={"freeze_layers": 1})
    first, second = model.model.bert.encoder.layer
    assert not any(p.requires_grad for p in first.parameters())
    assert all(p.requires_grad for p in second.parameters())
    params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert params == {id(p) for p in model.model.parameters() if p.requires_grad}
    # the frozen layer lost units but never trained: each row it kept is a row of the pretrained matrix
    pretrained = EmotionClassifier(model.hparams.model_name, model.id2label).model.bert.encoder.layer[0]
    kept, original = first.intermediate.dense.weight, pretrained.intermediate.dense.weight
    assert len(kept) < len(original)
    assert all(any(torch.equal(row, other) for other in original) for row in kept)


def test_cubic_schedule_masks_until_the_end_then_rebuilds(fit):
    watch = _Watch()
    fit([StructuredPruning(units="ffn", ffn_amount=0.5, schedule="cubic", start_step=0, end_step=6, every_n_steps=2),
         watch], max_steps=8)
    removed = [24 * 2 - sum(s["ffn"] for s in shape) for shape in watch.shapes]
    assert removed[:6] == [0] * 6  # masked, not removed, while the share rises
    assert removed[6:] == [24, 24]  # rebuilt at end_step: half of the 48 neurons gone
    assert all(s["heads"] == 4 for s in watch.shapes[-1])  # units: ffn leaves heads alone


def test_per_layer_scope_and_taylor_importance(fit):
    model, _ = fit([StructuredPruning(head_amount=0.5, ffn_amount=0.5, importance="taylor", score_batches=2,
                                      start_step=2, scope="per_layer")], max_steps=4)
    assert structure.shape(model.model) == [{"heads": 2, "ffn": 12}] * 2


def test_taylor_scores_each_step_once_from_its_whole_gradient(fit, monkeypatch):
    """Under gradient accumulation each step is scored once, from the gradient of all its batches: scored after
    every backward, a step's first batch was counted again inside the second's .grad."""
    from emocompress.compression import structured_pruning

    scored, grads = [], []
    score = structured_pruning._taylor_scores

    def ffn_grad(model):
        layer = structure.layers(model)[0]
        return layer.get(layer.fam.ffn_out).weight.grad.clone()

    class Grads(Callback):
        def on_after_backward(self, trainer, pl_module):
            grads.append((trainer.global_step, ffn_grad(pl_module.model)))

    def spy(model):
        scored.append(ffn_grad(model))
        return score(model)

    monkeypatch.setattr(structured_pruning, "_taylor_scores", spy)
    fit([Grads(), StructuredPruning(ffn_amount=0.5, head_amount=0.0, importance="taylor", score_batches=2,
                                    start_step=2)], max_steps=3, accumulate_grad_batches=2)
    assert len(scored) == 2 and len([s for s, _ in grads if s < 2]) == 4  # steps 0 and 1: 4 backward passes
    for step, got in enumerate(scored):  # the gradient after the step's last backward: both of its batches
        torch.testing.assert_close(got, [g for s, g in grads if s == step][-1])


def test_the_last_head_of_a_layer_is_never_removed():
    kept = [torch.ones(2, dtype=torch.bool), torch.ones(8, dtype=torch.bool)]
    # layer 0's heads score far lowest: global ranking would take both
    assert _remove_lowest(kept, [torch.tensor([0.0, 0.0]), torch.arange(1.0, 9.0)], 0.9, "global")
    assert [int(k.sum()) for k in kept] == [1, 1]


def test_keep_units_rebuilds_only_the_layers_that_lose_units():
    model, indexed = tiny("bert"), tiny("bert")
    untouched = structure.layers(model)[1].get("intermediate.dense")
    heads = [torch.tensor([True, False, True, True]), torch.ones(4, dtype=torch.bool)]
    ffn = [torch.ones(24, dtype=torch.bool), torch.ones(24, dtype=torch.bool)]
    ffn[0][[3, 7]] = False
    moved = structure.keep_units(model, heads, ffn)
    # the same as keeping the True indices layer by layer
    structure.layers(indexed)[0].keep(heads=torch.tensor([0, 2, 3]), ffn=torch.tensor([i for i in range(24)
                                                                                       if i not in (3, 7)]))
    torch.testing.assert_close(_logits(model), _logits(indexed))
    assert model.config.layer_shapes == [{"heads": 3, "ffn": 22}, {"heads": 4, "ffn": 24}]
    assert structure.layers(model)[1].get("intermediate.dense") is untouched  # nothing to remove: not rebuilt
    assert len(moved) == 2 * 6  # weight and bias of layer 0's six linear layers


def test_checkpoints_resume_and_test_with_the_smaller_shape(fit, tmp_path, make_datamodule, tiny_trainer):
    model, trainer = fit([StructuredPruning(head_amount=0.5, ffn_amount=0.5, start_step=1)], max_steps=3)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["callbacks"]["StructuredPruning"]["rebuilt"] is True
    # resume: the freshly built (unpruned) model takes the checkpoint's shape, and training goes on
    resumed, _ = fit([StructuredPruning(head_amount=0.5, ffn_amount=0.5, start_step=1)], ckpt_path=ckpt, max_steps=5)
    assert structure.shape(resumed.model) == structure.shape(model.model)
    # test from the checkpoint in a module built unpruned, as `emocompress test --ckpt_path` does
    reloaded = EmotionClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    assert structure.shape(reloaded.model) == structure.shape(model.model)
    tiny_trainer().test(reloaded, datamodule=make_datamodule(model_dir=model.hparams.model_name, batch_size=4))
    assert reloaded.test_report["per_class"]


def test_resume_before_the_rebuild_holds_the_masks_again(fit, tmp_path):
    cubic = {"units": "heads", "head_amount": 0.5, "schedule": "cubic", "start_step": 0, "end_step": 8,
             "every_n_steps": 2}
    ckpt = tmp_path / "mid.ckpt"
    fit([StructuredPruning(**cubic), _SaveAt(5, ckpt)], max_steps=6)
    saved = torch.load(ckpt, weights_only=True)
    assert not saved["callbacks"]["StructuredPruning"]["rebuilt"]
    assert not [k for k in saved["state_dict"] if k.endswith(("_orig", "_mask"))]  # masks folded in
    watch = _Watch()
    model, _ = fit([StructuredPruning(**cubic), watch], ckpt_path=ckpt, max_steps=10)
    masked = [m for m in model.model.modules() if hasattr(m, "weight_mask")]
    assert not masked  # rebuilt at the end
    assert sum(s["heads"] for s in structure.shape(model.model)) == 4


def test_a_weights_only_checkpoint_before_the_rebuild_holds_plain_zeros(fit, tmp_path):
    # ModelCheckpoint(save_weights_only=True): Lightning skips the callbacks' on_save_checkpoint there, and the
    # masked units were saved as weight_orig/weight_mask, which neither test --ckpt_path nor HFExport could load.
    ckpt = tmp_path / "weights.ckpt"
    fit([StructuredPruning(units="heads", head_amount=0.5, schedule="cubic", start_step=0, end_step=8,
                           every_n_steps=2), _SaveAt(5, ckpt, weights_only=True)], max_steps=6)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    query = state["model.bert.encoder.layer.0.attention.self.query.weight"].view(4, 4, -1)  # (heads, head size, in)
    assert 0 < int((query == 0).all(-1).all(-1).sum()) < 4  # some heads removed as whole rows of zeros
    reloaded = EmotionClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    torch.testing.assert_close(reloaded.state_dict()["model.bert.encoder.layer.0.attention.self.query.weight"],
                               state["model.bert.encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"head_amount": 1.0}, r"head_amount must be in \[0, 1\)"),
    ({"ffn_amount": -0.1}, r"ffn_amount must be in \[0, 1\)"),
    ({"importance": "taylor", "score_batches": 8, "start_step": 4}, r"start_step \(4\) must be >= score_batches"),
    ({"schedule": "cubic"}, "end_step must be set"),
])
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**kwargs)


def test_a_model_without_heads_is_refused_before_training():
    from types import SimpleNamespace

    from emocompress.models.students import SmallEncoderClassifier, SmallEncoderConfig

    bilstm = SmallEncoderClassifier(SmallEncoderConfig(vocab_size=20, embedding_dim=4, hidden_size=4, num_labels=3))
    with pytest.raises(ValueError, match=r"StructuredPruning: SmallEncoderClassifier \(model type "
                                         r"'emocompress-small-encoder'\) has no attention heads .* supported model "
                                         r"types: \['bert'"):
        StructuredPruning().setup(None, SimpleNamespace(model=bilstm), "fit")


@pytest.mark.parametrize(("backend", "heads"), [("onnxruntime", ([1], [0, 2, 3])), ("onnxruntime", ([1, 2], [0, 3])),
                                               ("torch", ([1], [0, 2, 3]))])
def test_export_and_int8_of_a_pruned_model(backend, heads, tmp_path):
    import onnx

    from emocompress.compression.export import export_onnx, quantize
    from emocompress.models.loading import load_artifact

    model = tiny("bert", vocab_size=40)
    for layer, kept in zip(structure.layers(model), heads):
        layer.keep(heads=torch.tensor(kept), ffn=torch.arange(12))
    structure.record(model)
    ids = torch.randint(4, 40, (3, 9))
    fp32 = _logits(model, ids)
    if backend == "onnxruntime":
        onnx_fp32 = load_artifact(export_onnx(model, tmp_path / "onnx", None))
        # onnxruntime fuses attention when every layer kept as many heads; with uneven layers it must not
        fused = [n for n in onnx.load(tmp_path / "onnx" / "model.onnx").graph.node if n.op_type == "Attention"]
        assert len(fused) == (2 if len(heads[0]) == len(heads[1]) else 0)
        torch.testing.assert_close(onnx_fp32(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, fp32,
                                   atol=1e-4, rtol=1e-4)
    quantize(model, backend=backend, out_dir=tmp_path / "int8")
    int8 = load_artifact(tmp_path / "int8")
    torch.testing.assert_close(int8(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, fp32,
                               atol=0.05, rtol=0.05)


def test_a_checkpoint_with_masked_units_loads_into_the_rebuilt_model():
    # Under DDP (or with a best checkpoint from before the rebuild) the checkpoint holds the removed units as
    # zeros at the full shape: loading it into the smaller model drops them rather than growing the model back.
    model = tiny("bert")
    masked = copy.deepcopy(model)
    heads, ffn = torch.tensor([0, 3]), torch.tensor([2, 4, 6])
    layer = structure.layers(masked)[1]
    with torch.no_grad():
        for module, dim, kind in layer.linears().values():
            keep = torch.zeros(4 if kind == "heads" else 24, dtype=torch.bool)
            keep[heads if kind == "heads" else ffn] = True
            keep = keep.repeat_interleave(4) if kind == "heads" else keep
            module.weight[(~keep, slice(None)) if dim == 0 else (slice(None), ~keep)] = 0
            if dim == 0:
                module.bias[~keep] = 0
    structure.layers(model)[1].keep(heads=torch.tensor([0, 1]), ffn=torch.tensor([0, 1, 2]))  # any 2 heads, 3 neurons
    state = masked.state_dict()
    structure.fit_to_state_dict(model, state)
    model.load_state_dict(state)
    assert structure.shape(model)[1] == {"heads": 2, "ffn": 3}
    torch.testing.assert_close(_logits(model), _logits(masked))
