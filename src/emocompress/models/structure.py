"""The per-layer shape of a transformer encoder: its attention heads and FFN neurons, removing them, and
rebuilding a model of a recorded shape.

Structured pruning (``compression/structured_pruning.py``) leaves layers of different widths, which a
transformers config cannot express (one ``num_attention_heads``, one ``intermediate_size``). The shape
is recorded in ``config.layer_shapes`` (``[{"heads": 6, "ffn": 800}, ...]``, one entry per layer) whenever
a layer changes, and ``build`` / ``fit_to_state_dict`` make a model of that shape before weights load.

The head count is never stored in the attention module's config: BERT-, RoBERTa- and DistilBERT-style
self-attention reshape to ``(B, T, -1, head_size)``, so a layer's heads follow from its matrices' shape.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

SHAPE_KEY = "layer_shapes"
"""``config`` attribute holding the per-layer shape of a structurally pruned model."""


@dataclass(frozen=True)
class _Family:
    layers: str  # path of the layer list under ``model.base_model``
    attention: str  # the module holding the head size, under a layer
    qkv: tuple[str, str, str]  # query/key/value projections (rows: heads x head size), under a layer
    attention_out: str  # output projection (columns: heads x head size)
    ffn_in: str  # FFN up-projection (rows: neurons)
    ffn_out: str  # FFN down-projection (columns: neurons)


_BERT = _Family("encoder.layer", "attention.self", ("attention.self.query", "attention.self.key",
                "attention.self.value"), "attention.output.dense", "intermediate.dense", "output.dense")
_DISTILBERT = _Family("transformer.layer", "attention", ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
                      "attention.out_lin", "ffn.lin1", "ffn.lin2")
_FAMILIES = {"bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "camembert": _BERT, "distilbert": _DISTILBERT}
SUPPORTED = tuple(_FAMILIES)


def family(model: nn.Module) -> _Family:
    """Where ``model``'s heads and FFN neurons are.

    Raises:
        ValueError: ``model`` is not a BERT-, RoBERTa- or DistilBERT-style encoder (a small-encoder student has
            no heads; other families are not mapped).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(f"{type(model).__name__} (model type {model_type!r}) has no attention heads and FFN "
                         f"neurons this project knows how to remove; supported model types: {list(SUPPORTED)}")
    return _FAMILIES[model_type]


class Layer:
    """The prunable modules of one encoder layer, read from the model each time (they are replaced when
    the layer shrinks)."""

    def __init__(self, layer: nn.Module, fam: _Family):
        self.layer, self.fam = layer, fam

    def get(self, path: str) -> nn.Linear:
        return self.layer.get_submodule(path)

    @property
    def head_size(self) -> int:
        return self.layer.get_submodule(self.fam.attention).attention_head_size

    @property
    def heads(self) -> int:
        return self.get(self.fam.qkv[0]).out_features // self.head_size

    @property
    def ffn(self) -> int:
        return self.get(self.fam.ffn_in).out_features

    def linears(self) -> dict[str, tuple[nn.Linear, int, str]]:
        """path -> (module, the dimension of its weight that indexes units, "heads" or "ffn")."""
        fam = self.fam
        return {**{p: (self.get(p), 0, "heads") for p in fam.qkv},
                fam.attention_out: (self.get(fam.attention_out), 1, "heads"),
                fam.ffn_in: (self.get(fam.ffn_in), 0, "ffn"), fam.ffn_out: (self.get(fam.ffn_out), 1, "ffn")}

    def keep(self, heads: torch.Tensor | None = None, ffn: torch.Tensor | None = None) -> dict[int, tuple]:
        """Keep only the heads and FFN neurons with these indices (None: keep all of that kind), replacing
        the linear layers by smaller copies of the kept rows/columns.

        Returns:
            ``id`` of each replaced parameter -> (new parameter, kept indices along ``dim`` or None for
            all, ``dim``), for moving optimizer state.
        """
        moved = {}
        index = {"heads": None if heads is None else
                 (heads[:, None] * self.head_size + torch.arange(self.head_size)).flatten(),
                 "ffn": ffn}
        for path, (old, dim, kind) in self.linears().items():
            if index[kind] is None:
                continue
            idx = index[kind].to(old.weight.device)
            new = prune_linear_layer(old, idx, dim)
            new.weight.requires_grad_(old.weight.requires_grad)
            new.bias.requires_grad_(old.bias.requires_grad)
            moved[id(old.weight)] = (new.weight, idx, dim)
            moved[id(old.bias)] = (new.bias, idx if dim == 0 else None, 0)
            self.layer.set_submodule(path, new)
        self.sync_head_count()
        return moved

    def sync_head_count(self) -> None:
        """Set the attention module's head-count attributes to its matrices' (informational: forward infers
        the heads from the shapes)."""
        attention = self.layer.get_submodule(self.fam.attention)
        for name in ("num_attention_heads", "n_heads"):
            if hasattr(attention, name):
                setattr(attention, name, self.heads)
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = self.heads * self.head_size


def layers(model: nn.Module) -> list[Layer]:
    """The encoder layers of ``model`` (a transformers model, or its ``base_model``), in order."""
    fam = family(model)
    return [Layer(layer, fam) for layer in getattr(model, "base_model", model).get_submodule(fam.layers)]


def shape(model: nn.Module) -> list[dict[str, int]]:
    """``[{"heads": h, "ffn": n}, ...]``: the heads and FFN neurons each layer has now."""
    return [{"heads": layer.heads, "ffn": layer.ffn} for layer in layers(model)]


def record(model: nn.Module) -> None:
    """Write ``model``'s per-layer shape into ``model.config.layer_shapes``, or remove it if every layer has
    the config's uniform shape, so that ``save_pretrained`` carries it."""
    config = model.config
    uniform = {"heads": config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_heads,
               "ffn": config.intermediate_size if hasattr(config, "intermediate_size") else config.hidden_dim}
    current = shape(model)
    if all(s == uniform for s in current):
        if hasattr(config, SHAPE_KEY):
            delattr(config, SHAPE_KEY)
    else:
        setattr(config, SHAPE_KEY, current)


def keep_units(model: nn.Module, heads: list[torch.Tensor], ffn: list[torch.Tensor]) -> dict[int, tuple]:
    """Rebuild each layer of ``model`` with only the units its bool vectors mark True (``heads[i]``: (H,),
    ``ffn[i]``: (N,) for layer ``i``), leaving layers that keep every unit of a kind untouched, and record the
    new shape.

    Returns:
        what ``Layer.keep`` returns, for every layer: ``id`` of each replaced parameter -> (new parameter,
        kept indices along ``dim`` or None, ``dim``).
    """
    moved = {}
    for layer, keep_heads, keep_ffn in zip(layers(model), heads, ffn):
        moved.update(layer.keep(heads=None if keep_heads.all() else keep_heads.nonzero().flatten(),
                                ffn=None if keep_ffn.all() else keep_ffn.nonzero().flatten()))
    record(model)
    return moved


def is_pruned(config) -> bool:
    """Whether ``config`` records a per-layer shape (a structurally pruned model)."""
    return bool(getattr(config, SHAPE_KEY, None))


def _resize(model: nn.Module, target: list[dict[str, int]]) -> None:
    """Give each layer the heads/neurons counts of ``target``; weights are placeholders, to be loaded."""
    current = layers(model)
    if len(target) != len(current):
        raise ValueError(f"the recorded shape has {len(target)} layers, the model {len(current)}")
    for layer, want in zip(current, target):
        if (layer.heads, layer.ffn) == (want["heads"], want["ffn"]):
            continue
        for path, (old, dim, kind) in layer.linears().items():
            size = want[kind] * (layer.head_size if kind == "heads" else 1)
            shape_ = (size, old.in_features) if dim == 0 else (old.out_features, size)
            layer.layer.set_submodule(path, nn.Linear(shape_[1], shape_[0], device=old.weight.device,
                                                      dtype=old.weight.dtype))
        layer.sync_head_count()
    record(model)


def build(config, **kwargs) -> nn.Module:
    """``AutoModelForSequenceClassification.from_config(config)`` with the per-layer shape that ``config``
    records (randomly initialised: load weights after)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    if is_pruned(config):
        _resize(model, getattr(config, SHAPE_KEY))
    return model


def fit_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Make ``model`` and ``state`` (a state dict of this architecture, keys under ``prefix``) fit each other
    before ``load_state_dict``: a checkpoint written after structured pruning loads into the unpruned model its
    run was configured with, and the other way round.

    If ``state`` has more units than ``model`` but exactly ``model``'s shape once its all-zero units are left
    out (a checkpoint written while pruning masks held them at zero), those units are dropped from ``state``
    (in place); otherwise ``model``'s layers are reshaped to ``state``'s. A model without heads (small-encoder
    student) or a state dict of the same shape is left as it is."""
    try:
        current = layers(model)
    except ValueError:
        return
    base = "" if getattr(model, "base_model", model) is model else f"{model.base_model_prefix}."
    keys = [f"{prefix}{base}{layer.fam.layers}.{i}." for i, layer in enumerate(current)]
    target = []
    for key, layer in zip(keys, current):
        q, ffn_in = state.get(f"{key}{layer.fam.qkv[0]}.weight"), state.get(f"{key}{layer.fam.ffn_in}.weight")
        if q is None or ffn_in is None:
            return  # not this architecture's state dict: let load_state_dict report it
        target.append({"heads": q.shape[0] // layer.head_size, "ffn": ffn_in.shape[0]})
    now = shape(model)
    if target == now:
        return
    kept = [_nonzero_units(state, key, layer) for key, layer in zip(keys, current)]
    if [{"heads": len(h), "ffn": len(f)} for h, f in kept] == now:
        for key, layer, (heads, ffn) in zip(keys, current, kept):
            rows = {"heads": (heads[:, None] * layer.head_size + torch.arange(layer.head_size)).flatten(), "ffn": ffn}
            for path, (_, dim, kind) in layer.linears().items():
                state[f"{key}{path}.weight"] = state[f"{key}{path}.weight"].index_select(dim, rows[kind])
                if dim == 0:
                    state[f"{key}{path}.bias"] = state[f"{key}{path}.bias"].index_select(0, rows[kind])
    else:
        _resize(model, target)


def _nonzero_units(state: dict[str, torch.Tensor], key: str, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the heads and FFN neurons of one layer of ``state`` whose weights are not all zero."""
    used = {"heads": 0, "ffn": 0}
    for path, (_, dim, kind) in layer.linears().items():
        weight = state[f"{key}{path}.weight"]
        used[kind] = used[kind] + (weight != 0).sum(1 - dim)
        if dim == 0:
            used[kind] = used[kind] + (state[f"{key}{path}.bias"] != 0)
    heads = used["heads"].view(-1, layer.head_size).sum(1)
    return heads.nonzero().flatten(), used["ffn"].nonzero().flatten()
