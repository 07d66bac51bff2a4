"""Knowledge distillation: a frozen fine-tuned teacher trains a smaller student on the same data.

    emocompress fit -c configs/base.yaml -c configs/distill.yaml
"""

import hashlib
import logging
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from emocompress import pretrained
from emocompress.checkpoints import load_network, read_checkpoint
from emocompress.classifier import EmotionClassifier, model_inputs
from emocompress.students import RecurrentClassifier, RecurrentConfig, every_other_layer, keep_layers

log = logging.getLogger(__name__)


def distillation_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                        class_weights: torch.Tensor | None = None, alpha: float = 0.5, temperature: float = 2.0,
                        mse_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The weighted terms of the distillation loss; the loss is their sum.

    ``ce = alpha * CE_w(student, labels)``, ``kd = (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
    and ``mse = mse_weight * MSE(student, teacher)`` on raw logits. The T^2 factor (Hinton et al. 2015)
    keeps the soft-label gradients the same size whatever the temperature. KL and MSE are means over
    the batch; CE is weighted by ``class_weights`` as in the classifier.

    Args:
        student_logits: (N, C) float.
        teacher_logits: (N, C) float, no gradient needed.
        labels: (N,) int class ids.
        class_weights: (C,) float, or None for plain cross-entropy.
        alpha: weight of the gold labels, in [0, 1]; 1 trains on labels alone, 0 on the teacher alone.
        temperature: softmax temperature T > 0 of the soft labels.
        mse_weight: weight of the MSE between logits (0 leaves it out).

    >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    >>> {k: round(v.item(), 4) for k, v in distillation_losses(s, t, torch.tensor([0]), alpha=0.0).items()}
    {'ce': 0.0, 'kd': 1.8485, 'mse': 0.0}
    """
    teacher_logits = teacher_logits.float()
    student_logits = student_logits.float()
    ce = F.cross_entropy(student_logits, labels, weight=class_weights)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1), F.log_softmax(teacher_logits / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    mse = F.mse_loss(student_logits, teacher_logits)
    return {"ce": alpha * ce, "kd": (1 - alpha) * temperature**2 * kl, "mse": mse_weight * mse}


def patient_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                 layer_map: list[int]) -> torch.Tensor:
    """Patient-KD's hidden-state loss (Sun et al. 2019): the squared distance between the L2-normalised
    first-token ([CLS]) states of student layer ``i`` and teacher layer ``layer_map[i]``, averaged over layers.

    Args:
        student_hidden: ``output_hidden_states`` of the student: embeddings, then one (N, T, H) per layer.
        teacher_hidden: the same for the teacher, (N, T', H); the texts may be tokenized differently,
            only the first token is compared.
        layer_map: teacher layer (0-based) for each student layer.
    """
    terms = [(F.normalize(student_hidden[i + 1][:, 0].float(), dim=-1)
              - F.normalize(teacher_hidden[j + 1][:, 0].float(), dim=-1)).pow(2).sum(-1).mean()
             for i, j in enumerate(layer_map)]
    return torch.stack(terms).mean()


def load_teacher(source: str, trust_remote_code: bool = False) -> tuple[PreTrainedModel, object]:
    """The teacher network and its tokenizer from an ``hf_model`` export folder, a hub name, or an
    ``EmotionClassifier`` Lightning checkpoint (``.ckpt``, read with ``weights_only=True``).

    Raises:
        ValueError: the checkpoint cannot be read or is not an ``EmotionClassifier``'s.
    """
    if not source.endswith(".ckpt"):
        path = pretrained.resolve(source)
        return (AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code),
                AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
    try:
        hparams = read_checkpoint(source).get("hyper_parameters", {})
    except ValueError as err:
        raise ValueError(f"model.teacher: {err}") from err
    if "teacher" in hparams or "model_name" not in hparams or "id2label" not in hparams:
        raise ValueError(f"model.teacher: {source} is not an EmotionClassifier checkpoint; give the hf_model folder "
                         "that its run exported instead")
    id2label = {int(i): name for i, name in hparams["id2label"].items()}
    base = pretrained.resolve(hparams["model_name"])
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(id2label), id2label=id2label, label2id={n: i for i, n in id2label.items()},
        ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code)
    try:
        load_network(model, source)
    except ValueError as err:
        raise ValueError(f"model.teacher: {err}") from err
    return model, AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)


def _tokenizer_spec(tokenizer) -> str:
    """Everything that decides how a tokenizer splits text (vocabulary, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))


class Distiller(EmotionClassifier):
    """Trains a student (``self.model``) from a frozen, fine-tuned teacher with the classifier's data,
    class weights, metrics and outputs; the loss is ``distillation_losses`` (plus ``patient_loss`` if
    ``hidden_weight > 0``). The teacher is in eval mode, has no gradients, never changes, and is kept
    out of the module tree, so it is not in checkpoints, the optimizer, DDP or the compression callbacks.

    Teacher and student may use different tokenizers: the datamodule tokenizes for the student
    (``data.model_name``) and the teacher tokenizes the raw texts itself. With ``logits_cache`` the
    teacher's logits over the train split are computed once and stored in that folder, keyed by the
    teacher's weights and tokenizer and by each text, so later epochs, resumed runs and other runs
    with the same teacher reuse them; without it the teacher runs on every training batch.

    Args:
        teacher: the fine-tuned teacher: an ``hf_model`` export folder, a hub name, or a classifier ``.ckpt``.
            Its labels must be the data's, in the same order.
        student: ``layers``: a copy of the teacher with only ``student_layers`` kept (DistilBERT-style
            initialisation; ``data.model_name`` must then be the teacher's tokenizer); ``pretrained``:
            ``model_name`` (any HF model) with a fresh head; ``bilstm`` / ``meanpool``: a
            ``RecurrentClassifier`` over ``model_name``'s tokenizer, learned from scratch.
        student_layers: teacher layers (0-based) a ``layers`` student keeps; default every other one,
            ending with the last (6 layers -> [1, 3, 5]).
        embedding_dim: token embedding width of a ``bilstm``/``meanpool`` student.
        hidden_size: LSTM units per direction (``bilstm``) or feed-forward width (``meanpool``).
        alpha: weight of the gold-label cross-entropy, in [0, 1]; the soft-label KL gets ``1 - alpha``.
            ``alpha: 1`` is the no-distillation control (the teacher is then not run at all).
        temperature: softmax temperature of the soft labels, > 0.
        mse_weight: weight of an extra MSE loss between student and teacher logits, >= 0.
        hidden_weight: weight of the Patient-KD loss between [CLS] states of mapped layers, >= 0; needs a
            transformer student as wide as the teacher, and the live teacher (no ``logits_cache``).
        logits_cache: folder for the cached teacher logits; null runs the teacher on every batch.
        teacher_batch_size: batch size of the teacher when it fills the cache.
        **kwargs: the ``EmotionClassifier`` arguments (``model_name``, ``id2label``, ``lr``, ...).
    """

    def __init__(self, teacher: str, student: Literal["layers", "pretrained", "bilstm", "meanpool"] = "layers",
                 student_layers: list[int] | None = None, embedding_dim: int = 128, hidden_size: int = 128,
                 alpha: float = 0.5, temperature: float = 2.0, mse_weight: float = 0.0, hidden_weight: float = 0.0,
                 logits_cache: str | None = None, teacher_batch_size: int = 64, **kwargs):
        if not 0 <= alpha <= 1:
            raise ValueError(f"model.alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be positive, got {temperature}")
        for key, value in (("mse_weight", mse_weight), ("hidden_weight", hidden_weight)):
            if value < 0:
                raise ValueError(f"model.{key} must be >= 0, got {value}")
        for key, value in (("embedding_dim", embedding_dim), ("hidden_size", hidden_size),
                           ("teacher_batch_size", teacher_batch_size)):
            if value < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {value}")
        if hidden_weight > 0 and student in ("bilstm", "meanpool"):
            raise ValueError(f"model.hidden_weight needs a transformer student; a {student} student has no layers "
                             "to match, set it to 0")
        if hidden_weight > 0 and logits_cache is not None:
            raise ValueError("model.hidden_weight > 0 needs the teacher's hidden states on every batch, which are "
                             "not cached: set model.logits_cache to null or model.hidden_weight to 0")
        super().__init__(**kwargs)

    # ---- building: the base class calls this from __init__ ----
    def _build_model(self) -> PreTrainedModel:
        hp = self.hparams
        teacher, self.teacher_tokenizer = load_teacher(hp.teacher, hp.trust_remote_code)
        if teacher.config.id2label != self.id2label:
            raise ValueError(f"model.teacher: {hp.teacher} predicts {teacher.config.id2label}, but the data's labels "
                             f"are {self.id2label}; distil from a teacher fine-tuned on this label set")
        # Outside the module tree on purpose: not in state_dict (checkpoints), parameters() (optimizer,
        # DDP), Lightning's model.train(), or what the compression callbacks see.
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        layers = hp.student_layers or every_other_layer(teacher.config.num_hidden_layers)  # for `layers` students
        if hp.student == "pretrained":
            student = super()._build_model()
        elif hp.student == "layers":
            tokenizer = AutoTokenizer.from_pretrained(pretrained.resolve(hp.model_name))
            if _tokenizer_spec(tokenizer) != _tokenizer_spec(self.teacher_tokenizer):
                raise ValueError(f"data.model_name: a 'layers' student reads the teacher's token ids, but "
                                 f"{hp.model_name}'s tokenizer differs from {hp.teacher}'s; set data.model_name "
                                 "to the teacher")
            student = keep_layers(teacher, layers).requires_grad_(True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(pretrained.resolve(hp.model_name))
            student = RecurrentClassifier(RecurrentConfig(
                vocab_size=len(tokenizer), embedding_dim=hp.embedding_dim, hidden_size=hp.hidden_size,
                encoder=hp.student, pad_token_id=tokenizer.pad_token_id or 0, num_labels=len(self.id2label),
                id2label=self.id2label, label2id={n: i for i, n in self.id2label.items()}))
        if hp.hidden_weight > 0:
            self.layer_map = layers if hp.student == "layers" else self._layer_map(student)
        return student

    def _layer_map(self, student: PreTrainedModel) -> list[int]:
        """Teacher layer for each layer of a ``pretrained`` student: evenly spaced, ending with the last."""
        width, teacher_width = student.config.hidden_size, self.teacher.config.hidden_size
        if width != teacher_width:
            raise ValueError(f"model.hidden_weight: the student is {width} wide and the teacher {teacher_width}; "
                             "hidden states can only be matched at equal widths, set model.hidden_weight to 0")
        depth, teacher_depth = student.config.num_hidden_layers, self.teacher.config.num_hidden_layers
        return [round((i + 1) * teacher_depth / depth) - 1 for i in range(depth)]

    # ---- the teacher ----
    @property
    def _needs_teacher(self) -> bool:
        hp = self.hparams
        return hp.alpha < 1 or hp.mse_weight > 0 or hp.hidden_weight > 0

    def on_fit_start(self):
        self.teacher.to(self.device)
        datamodule = self.trainer.datamodule
        self.train_texts = datamodule.texts("train")
        self.max_length = datamodule.hparams.get("max_length", 128)
        self.cached_logits = None
        if self._needs_teacher and self.hparams.logits_cache is not None:
            self.cached_logits = self._load_or_compute_logits().to(self.device)

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.teacher_tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                         return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}

    @torch.no_grad()
    def teacher_logits(self, texts: list[str]) -> torch.Tensor:
        """(N, C) float logits of the teacher for raw ``texts``, in batches of similar length."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), len(self.id2label))
        size = self.hparams.teacher_batch_size
        with self.trainer.precision_plugin.forward_context():
            for start in range(0, len(texts), size):
                rows = order[start:start + size]
                out[rows] = self.teacher(**self._encode([texts[i] for i in rows])).logits.float().cpu()
        return out

    def _cache_file(self) -> Path:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.teacher.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(_tokenizer_spec(self.teacher_tokenizer).encode())
        digest.update(f"max_length={self.max_length}".encode())
        return Path(self.hparams.logits_cache) / f"teacher-{digest.hexdigest()[:16]}.pt"

    def _load_or_compute_logits(self) -> torch.Tensor:
        """(N, C) teacher logits for the train texts: from the cache, computing (and adding) the missing ones."""
        path = self._cache_file()
        keys = [hashlib.sha1(text.encode()).hexdigest() for text in self.train_texts]
        known: dict[str, torch.Tensor] = {}
        if path.exists():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                known = dict(zip(stored["keys"], stored["logits"]))
            except Exception as err:  # truncated or foreign file: unpickling raises many types
                raise ValueError(f"model.logits_cache: cannot read {path} as a teacher-logits cache "
                                 f"({type(err).__name__}); delete it to recompute") from err
        missing = {key: text for key, text in zip(keys, self.train_texts) if key not in known}
        if missing:
            known.update(zip(missing, self.teacher_logits(list(missing.values()))))
            # Every rank computes the same logits; one writes, to a temporary file moved into place, so a
            # reader never sees half a file.
            if self.trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save({"keys": list(known), "logits": torch.stack(list(known.values()))}, tmp)
                os.replace(tmp, path)
        rank_zero_info(f"teacher logits: {len(keys) - len(missing)} of {len(keys)} train texts from {path}, "
                       f"{len(missing)} computed")
        return torch.stack([known[key] for key in keys])

    # ---- training ----
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        hidden = hp.hidden_weight > 0
        student = self.model(**model_inputs(batch), output_hidden_states=hidden)
        if not self._needs_teacher:  # the alpha = 1 control: plain weighted cross-entropy
            teacher_logits, teacher_hidden = student.logits.detach(), None
        elif self.cached_logits is not None:
            teacher_logits, teacher_hidden = self.cached_logits[batch["idx"]], None
        else:
            with torch.no_grad():
                out = self.teacher(**self._encode([self.train_texts[i] for i in batch["idx"].tolist()]),
                                   output_hidden_states=hidden)
            teacher_logits, teacher_hidden = out.logits, out.hidden_states
        losses = distillation_losses(student.logits, teacher_logits, batch["labels"], self.class_weights,
                                     hp.alpha, hp.temperature, hp.mse_weight)
        if hidden:
            losses["hidden"] = hp.hidden_weight * patient_loss(student.hidden_states, teacher_hidden, self.layer_map)
        loss = torch.stack(list(losses.values())).sum()
        self.log_dict({f"train/{name}": value for name, value in losses.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss
