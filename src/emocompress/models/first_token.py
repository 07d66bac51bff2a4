"""The encoder's last layer computed for the first token only: the one a sequence classifier reads.

BERT-, RoBERTa- and DistilBERT-style ``...ForSequenceClassification`` heads read the last layer's output at the
first token ([CLS], <s>) and nothing else. The last layer still computes all T outputs, and backward goes
through them, although T - 1 of them have no effect on the logits. ``first_token_only`` runs that layer for the
first token alone: its keys and values still come from every token, but its queries, attention output and FFN
are (B, 1, H) instead of (B, T, H). Per token the layer multiplies by 12 H x H weights (Q, K, V and the
attention output 4; the FFN 8 at the usual 4H inner width); only K and V (2) still run for every token, so
about 5/6 of the layer's matrix products are skipped. What that buys in training speed is measured in
reports/training_speed/README.md. The logits are the same up to rounding (``tests/test_first_token.py`` checks
logits and gradients against the full forward).

The layer's forward is replaced only inside the ``with`` block, on that model object, so checkpoints, exports
and anything that asks for hidden states (patient distillation) see the unchanged model.
"""

import contextlib
from functools import partial

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from emocompress.models import structure


def _attend(attention: nn.Module, q_lin: nn.Linear, k_lin: nn.Linear, v_lin: nn.Linear, hidden: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Self-attention of the first token over all T tokens: (B, T, H) -> (B, 1, heads x head size), computed
    like the model's own attention (its implementation, scaling and dropout)."""
    batch, length, _ = hidden.shape
    size = attention.attention_head_size  # heads follow from the matrices' shape (structured pruning)
    q = q_lin(hidden[:, :1]).view(batch, 1, -1, size).transpose(1, 2)  # (B, heads, 1, size)
    k = k_lin(hidden).view(batch, length, -1, size).transpose(1, 2)  # (B, heads, T, size)
    v = v_lin(hidden).view(batch, length, -1, size).transpose(1, 2)
    if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
        mask = mask[:, :, :1]  # (B, 1, T, T) -> the first query's row
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    out, _ = attend(attention, q, k, v, mask, dropout=attention.dropout.p if attention.training else 0.0,
                    scaling=attention.scaling)  # (B, 1, heads, size)
    return out.reshape(batch, 1, -1)


def _bert_layer(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                **kwargs) -> torch.Tensor:
    """``BertLayer.forward`` (RoBERTa's is the same) for the first token; the rest of its arguments serve
    decoders and caches, which a classifier does not use."""
    self_attention = layer.attention.self
    context = _attend(self_attention, self_attention.query, self_attention.key, self_attention.value, hidden,
                      attention_mask)
    x = layer.attention.output(context, hidden[:, :1])  # dense, dropout, LayerNorm(. + residual)
    return layer.output(layer.intermediate(x), x)


def _distilbert_layer(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                      **kwargs) -> torch.Tensor:
    """DistilBERT's ``TransformerBlock.forward`` for the first token."""
    attention = layer.attention
    context = _attend(attention, attention.q_lin, attention.k_lin, attention.v_lin, hidden, attention_mask)
    x = layer.sa_layer_norm(attention.out_lin(context) + hidden[:, :1])
    return layer.output_layer_norm(layer.ffn(x) + x)


# by where the encoder family (``structure.py``, which maps model types to families) keeps its layers
_LAYERS = {"encoder.layer": _bert_layer, "transformer.layer": _distilbert_layer}


def supported(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` sequence classifier that reads only the first token of a
    BERT-, RoBERTa- or DistilBERT-style encoder, with eager or SDPA attention (other attention kernels take
    other mask formats)."""
    config = getattr(model, "config", None)
    return (type(model).__module__.startswith("transformers.models.")  # not remote code with its own head
            and type(model).__name__.endswith("ForSequenceClassification")
            and getattr(config, "model_type", None) in structure.SUPPORTED
            and structure.family(model).layers in _LAYERS and not getattr(config, "is_decoder", False)
            and getattr(config, "_attn_implementation", None) in ("eager", "sdpa"))


@contextlib.contextmanager
def first_token_only(model: nn.Module, enabled: bool = True):
    """Within the block, ``model``'s last encoder layer computes the first token only (see the module doc),
    if ``enabled`` and ``supported(model)``; otherwise the model runs unchanged. Its ``last_hidden_state`` is
    then (B, 1, H): use it for logits, not for hidden states."""
    if not (enabled and supported(model)):
        yield
        return
    layers = structure.family(model).layers
    layer = model.base_model.get_submodule(layers)[-1]
    layer.forward = partial(_LAYERS[layers], layer)  # an instance attribute: this layer only
    try:
        yield
    finally:
        del layer.forward
