"""Freezing the bottom of a network (``model.freeze_embeddings``, ``model.freeze_layers``) and the optimizer's
parameter groups that follow from it: frozen parameters stay in the model and its checkpoints, but train no more.

Speed and macro F1 of frozen runs: reports/training_speed/README.md, reports/benchmark_freeze/README.md.
"""

import logging

from torch import nn

from emocompress.models import structure

log = logging.getLogger(__name__)


def freeze(model: nn.Module, layers: int = 0, name: str = "the model") -> int:
    """Turn off gradients of ``model``'s input embeddings and its first ``layers`` encoder layers. Frozen
    parameters stay in the model and its checkpoints, but not in the optimizer (``parameter_groups``), and
    autograd does not go below the first trained layer.

    Args:
        model: a ``transformers`` model; BERT-style ones keep token, position and type tables (and their
            LayerNorm) in ``base_model.embeddings``, others are frozen at their input embeddings.
        layers: encoder layers to freeze from the bottom, in [0, number of layers]; needs a BERT-, RoBERTa- or
            DistilBERT-style encoder when above 0.
        name: what the model is called in messages (its ``model.model_name``).

    Returns:
        The number of parameters that still train.

    Raises:
        ValueError: ``layers`` is above 0 and ``model`` is of an unmapped family, or has fewer layers.
    """
    base = model.base_model
    embeddings = getattr(base, "embeddings", None)  # BERT & co. keep token, position and type tables there
    frozen = [embeddings if isinstance(embeddings, nn.Module) else model.get_input_embeddings()]
    if layers:
        try:
            stack = base.get_submodule(structure.family(model).layers)
        except ValueError as err:
            raise ValueError(f"model.freeze_layers: {err}") from err
        if layers > len(stack):
            raise ValueError(f"model.freeze_layers is {layers}, but {name} has {len(stack)} layers")
        frozen += list(stack[:layers])
    for module in frozen:
        module.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("frozen: the embeddings and %d of the encoder layers; %.1fM parameters train", layers, trainable / 1e6)
    return trainable


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of ``model``'s trainable parameters, the usual BERT recipe: ``weight_decay`` on
    matrices, none on biases and LayerNorm weights (the 1-D parameters). Frozen parameters are left out.

    >>> groups = parameter_groups(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)), weight_decay=0.01)
    >>> [([tuple(p.shape) for p in g["params"]], g["weight_decay"]) for g in groups]
    [([(2, 3)], 0.01), ([(2,), (2,), (2,)], 0.0)]
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

