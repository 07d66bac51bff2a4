"""Small students for distillation: a transformer cut from its teacher, and a small non-transformer encoder
(BiLSTM, CNN or mean-pooled embeddings) learned from scratch.

Both are ordinary ``transformers`` models: they save with ``save_pretrained``, load with
``AutoModelForSequenceClassification.from_pretrained`` (the small encoder once this module is imported, which
registers it), and the compression callbacks treat them like any fine-tuned model.
"""

import copy
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from emocompress.models import structure


def every_other_layer(num_layers: int) -> list[int]:
    """Teacher layers a half-depth student keeps: every other one, ending with the last, whose output
    the teacher's pooler and head were trained on.

    >>> every_other_layer(6)
    [1, 3, 5]
    >>> every_other_layer(5)
    [0, 2, 4]
    """
    return list(range(num_layers - 1, -1, -2))[::-1]


def _layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The encoder's list of transformer blocks, with its parent and attribute name. Found by shape,
    not by name, so BERT (``encoder.layer``), RoBERTa and DistilBERT (``transformer.layer``) all work."""
    depth = model.config.num_hidden_layers
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.ModuleList) and len(child) == depth]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: cannot tell which module list holds its {depth} layers "
                         f"({len(found)} candidates); use model.student: pretrained with a smaller model instead")
    return found[0]


def keep_layers(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of ``teacher`` with only the transformer ``layers`` (0-based, in order) kept, as
    DistilBERT initialised its student: embeddings, kept layers, pooler and head are the teacher's
    weights, exactly. ``teacher`` is not changed.

    Raises:
        ValueError: ``layers`` is empty, unsorted, repeats a layer or names one the teacher lacks.
    """
    depth = teacher.config.num_hidden_layers
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= depth:
        raise ValueError(f"model.student_layers must be increasing layer numbers in [0, {depth - 1}] "
                         f"(the teacher has {depth} layers), got {layers}")
    student = copy.deepcopy(teacher)
    parent, name, stack = _layer_stack(student)
    setattr(parent, name, nn.ModuleList(stack[i] for i in layers))
    student.config.num_hidden_layers = len(layers)
    if structure.is_pruned(student.config):  # the kept layers' own widths
        structure.record(student)
    return student


ENCODERS = ("bilstm", "meanpool", "cnn")  # the students learned from scratch over a tokenizer's ids


class SmallEncoderConfig(PretrainedConfig):
    """Configuration of ``SmallEncoderClassifier``.

    Args:
        vocab_size: rows of the embedding table (the tokenizer's vocabulary size).
        embedding_dim: width of the learned token embeddings.
        hidden_size: LSTM units per direction (``bilstm``), width of the feed-forward layer (``meanpool``),
            or filters per kernel width (``cnn``).
        encoder: ``bilstm`` (a bidirectional LSTM, max-pooled over tokens), ``meanpool`` (token
            embeddings averaged, then one feed-forward layer) or ``cnn`` (1-D convolutions of
            ``kernel_sizes`` tokens, ReLU, max-pooled over positions: Kim 2014).
        kernel_sizes: widths, in tokens, of the ``cnn`` filters.
        dropout: dropout before the classification layer.
    """

    model_type = "emocompress-small-encoder"

    def __init__(self, vocab_size: int = 30522, embedding_dim: int = 128, hidden_size: int = 128,
                 encoder: str = "bilstm", kernel_sizes: list[int] = (3, 4, 5), dropout: float = 0.1,
                 pad_token_id: int = 0, **kwargs):
        if encoder not in ENCODERS:
            raise ValueError(f"SmallEncoderConfig.encoder must be one of {list(ENCODERS)}, got {encoder!r}")
        if not kernel_sizes or min(kernel_sizes) < 1:
            raise ValueError(f"SmallEncoderConfig.kernel_sizes must be positive token counts, got {kernel_sizes}")
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        self.encoder = encoder
        self.kernel_sizes = list(kernel_sizes)
        self.dropout = dropout
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class _SavedAsRecurrentConfig(SmallEncoderConfig):
    """Reads the ``config.json`` of students saved before the rename (``model_type: emocompress-recurrent``,
    ``architectures: [RecurrentClassifier]``) as the ``SmallEncoderConfig`` it is: the keys and the weights' names
    did not change. Saved again, such a student writes the current names."""

    model_type = "emocompress-recurrent"

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        config_dict = {**config_dict, "model_type": SmallEncoderConfig.model_type,
                       "architectures": ["SmallEncoderClassifier"]}
        return SmallEncoderConfig.from_dict(config_dict, **kwargs)


class SmallEncoderClassifier(PreTrainedModel):
    """A non-transformer text classifier over learned token embeddings, pooled over the text's tokens: a BiLSTM
    with max pooling, a CNN with max pooling, or mean-pooled embeddings with one feed-forward layer
    (``config.encoder``). Called like any sequence classifier:
    ``model(input_ids=(B, T), attention_mask=(B, T)).logits`` is (B, C); padding must be on the right
    (the default of BERT and RoBERTa tokenizers)."""

    config_class = SmallEncoderConfig
    base_model_prefix = "small_encoder"

    def __init__(self, config: SmallEncoderConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        if config.encoder == "bilstm":
            # Two one-way LSTMs rather than one bidirectional: see _bilstm_max.
            self.forward_lstm = nn.LSTM(config.embedding_dim, config.hidden_size, batch_first=True)
            self.backward_lstm = nn.LSTM(config.embedding_dim, config.hidden_size, batch_first=True)
            width = 2 * config.hidden_size
        elif config.encoder == "cnn":
            # padding k - 1: every text, even one shorter than k tokens, has windows (zeros beyond its ends)
            self.convolutions = nn.ModuleList(nn.Conv1d(config.embedding_dim, config.hidden_size, k, padding=k - 1)
                                              for k in config.kernel_sizes)
            width = len(config.kernel_sizes) * config.hidden_size
        else:
            self.feed_forward = nn.Sequential(nn.Linear(config.embedding_dim, config.hidden_size), nn.GELU())
            width = config.hidden_size
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(width, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        tokens = self.embeddings(input_ids)  # (B, T) -> (B, T, E)
        if self.config.encoder == "bilstm":
            pooled = self._bilstm_max(tokens, mask)  # (B, 2H)
        elif self.config.encoder == "cnn":
            pooled = self._cnn_max(tokens, mask)  # (B, K*H)
        else:
            mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, E)
            pooled = self.feed_forward(mean)  # (B, H)
        logits = self.classifier(self.dropout(pooled))  # (B, C)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _bilstm_max(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The backward LSTM reads each text reversed within its own length (padding stays at the end), so
        # it starts at the text's last token, not at padding: a text gets the same logits alone or in a
        # right-padded batch. Plain gathers rather than packed sequences, so it exports to ONNX as is.
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(mask)  # (B, T)
        lengths = mask.sum(1, keepdim=True)  # (B, 1)
        flip = torch.where(positions < lengths, lengths - 1 - positions, positions)[..., None]  # (B, T, 1)
        forward, _ = self.forward_lstm(tokens)  # (B, T, E) -> (B, T, H)
        backward, _ = self.backward_lstm(tokens.gather(1, flip.expand_as(tokens)))
        states = torch.cat([forward, backward.gather(1, flip.expand_as(backward))], dim=-1)  # (B, T, 2H)
        return states.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)  # (B, 2H)


    def _cnn_max(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Padding tokens become zero vectors, as the convolution's own zero padding beyond the text's end, and
        # windows that start past the text's end are masked: a text gets the same logits alone or in a
        # right-padded batch.
        tokens = (tokens * mask[..., None]).transpose(1, 2)  # (B, E, T)
        lengths = mask.sum(1, keepdim=True)  # (B, 1)
        pooled = []
        for conv in self.convolutions:
            features = torch.relu(conv(tokens))  # (B, H, T + k - 1); window t ends at token t
            positions = torch.arange(features.shape[-1], device=tokens.device)
            starts_in_text = (positions < lengths + conv.kernel_size[0] - 1)[:, None, :]  # (B, 1, T + k - 1)
            pooled.append(features.masked_fill(~starts_in_text, 0).amax(dim=-1))  # ReLU >= 0: 0 is neutral
        return torch.cat(pooled, dim=-1)  # (B, K*H)


def build_student(kind: Literal["layers", "pretrained", "bilstm", "meanpool", "cnn"], teacher: PreTrainedModel,
                  id2label: dict[int, str], *, tokenizer=None, layers: list[int] | None = None,
                  embedding_dim: int = 128, hidden_size: int = 128,
                  pretrained_builder: Callable[[], PreTrainedModel] | None = None) -> PreTrainedModel:
    """The student network of a distillation, ready to train (all its parameters require gradients).

    Args:
        kind: ``layers``: a copy of ``teacher`` keeping ``layers`` (``keep_layers``); ``pretrained``: what
            ``pretrained_builder()`` returns (a pretrained model with a fresh head); ``bilstm`` / ``meanpool`` /
            ``cnn``: a ``SmallEncoderClassifier`` over ``tokenizer``'s vocabulary, learned from scratch.
        teacher: the fine-tuned teacher network; it is not changed.
        id2label: label names by class id, for a small encoder's head.
        tokenizer: the tokenizer whose ids the student reads; a small encoder needs it (vocabulary size,
            padding id). Loaded by the caller, so it is read once.
        layers: teacher layers (0-based, increasing) a ``layers`` student keeps, e.g. ``every_other_layer``.
        embedding_dim: token embedding width of a small encoder.
        hidden_size: LSTM units per direction (``bilstm``), feed-forward width (``meanpool``) or filters per
            kernel width (``cnn``).
        pretrained_builder: builds a ``pretrained`` student.

    Raises:
        TypeError: ``kind`` needs an argument that was not given.
        ValueError: ``kind`` is unknown, or ``layers`` are impossible for the teacher.
    """
    needs = {"layers": ("layers", layers), "pretrained": ("pretrained_builder", pretrained_builder),
             **{encoder: ("tokenizer", tokenizer) for encoder in ENCODERS}}
    if kind not in needs:
        raise ValueError(f"model.student must be one of {list(needs)}, got {kind!r}")
    name, value = needs[kind]
    if value is None:
        raise TypeError(f"build_student: a {kind!r} student needs {name}")
    if kind == "layers":
        return keep_layers(teacher, layers).requires_grad_(True)
    if kind == "pretrained":
        return pretrained_builder()
    return SmallEncoderClassifier(SmallEncoderConfig(
        vocab_size=len(tokenizer), embedding_dim=embedding_dim, hidden_size=hidden_size, encoder=kind,
        pad_token_id=tokenizer.pad_token_id or 0, num_labels=len(id2label), id2label=id2label,
        label2id={n: i for i, n in id2label.items()}))


AutoConfig.register(SmallEncoderConfig.model_type, SmallEncoderConfig)
AutoConfig.register(_SavedAsRecurrentConfig.model_type, _SavedAsRecurrentConfig)
AutoModelForSequenceClassification.register(SmallEncoderConfig, SmallEncoderClassifier)
