"""Knowledge distillation: a frozen fine-tuned teacher trains a smaller student on the same data.

    emocompress fit -c configs/trainer/default.yaml -c configs/recipes/distill.yaml
"""

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel

from emocompress.io import atomic_file
from emocompress.models import pretrained
from emocompress.models.checkpoints import label_columns, reorder_head, stored_labels
from emocompress.models.classifier import EmotionClassifier, model_inputs
from emocompress.models.first_token import first_token_only
from emocompress.models.loading import load_classifier
from emocompress.models.students import ENCODERS, build_student, every_other_layer

log = logging.getLogger(__name__)


def distillation_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                        class_weights: torch.Tensor | None = None, alpha: float = 0.5, temperature: float = 2.0,
                        mse_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The weighted terms of the distillation loss; the loss is their sum.

    ``ce = alpha * CE_w(student, labels)``, ``kd = (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
    and ``mse = mse_weight * MSE(student, teacher)`` on raw logits. The T^2 factor (Hinton et al. 2015)
    keeps the soft-label gradients the same size whatever the temperature. KL and MSE are means over
    the batch; CE is weighted by ``class_weights`` as in the classifier, over the rows with a gold label
    (0 when a batch has none).

    Args:
        student_logits: (N, C) float.
        teacher_logits: (N, C) float, no gradient needed.
        labels: (N,) int class ids; -100 marks a row without a gold label (an augmented text), which only
            the teacher's terms see.
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
    # F.cross_entropy's weighted mean over the gold rows, written out so that a batch without any is 0, not
    # 0 / 0, with no data-dependent branch (which would wait for the GPU on every step).
    gold = (labels >= 0).float()  # (N,)
    row_weights = gold if class_weights is None else gold * class_weights[labels.clamp(min=0)]
    nll = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")  # (N,)
    ce = (row_weights * nll).sum() / row_weights.sum().clamp(min=torch.finfo(nll.dtype).tiny)
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


def _spread_layer_map(student: PreTrainedModel, teacher: PreTrainedModel) -> list[int]:
    """Teacher layer for each layer of a ``pretrained`` student: evenly spaced, ending with the last."""
    width, teacher_width = student.config.hidden_size, teacher.config.hidden_size
    if width != teacher_width:
        raise ValueError(f"model.hidden_weight: the student is {width} wide and the teacher {teacher_width}; "
                         "hidden states can only be matched at equal widths, set model.hidden_weight to 0")
    depth, teacher_depth = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    return [round((i + 1) * teacher_depth / depth) - 1 for i in range(depth)]


def tokenizer_spec(tokenizer) -> str:
    """Everything that decides how a tokenizer splits text (vocabulary, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))


class Teacher:
    """A frozen, fine-tuned classifier and its tokenizer: its logits (or outputs) for raw texts, and the
    on-disk cache of its logits. In eval mode, without gradients, never changed.

    Not an ``nn.Module`` on purpose: a LightningModule holding it does not see its network, so the
    teacher is not in ``state_dict`` (checkpoints), ``parameters()`` (optimizer, DDP), Lightning's
    ``model.train()``, or what the compression callbacks see.

    Args:
        source: an ``hf_model`` export folder, a hub name, or a classifier ``.ckpt`` (``load_classifier``).
        id2label: the data's labels: the teacher must have been trained on the same set, and its classes are put
            in their order (matched by name); None keeps the teacher's own.
        trust_remote_code: allow the model folder to run its own code.
        batch_size: texts per forward pass when computing logits.

    Raises:
        ValueError: the teacher cannot be loaded, or was trained on other labels than ``id2label``.
    """

    def __init__(self, source: str, id2label: dict[int, str] | None = None, trust_remote_code: bool = False,
                 batch_size: int = 64):
        network, self.tokenizer = load_classifier(source, trust_remote_code)
        if id2label:
            # Its classes are the labels it was trained on: matched to the data's by name, its head reordered
            # once, so that its logits (and a student cut from it) follow the data's order.
            labels = stored_labels(id2label)
            where = Path(source, "config.json") if Path(source).is_dir() else source
            try:
                reorder_head(network, label_columns(stored_labels(network.config.id2label), labels, str(where)))
            except ValueError as err:
                raise ValueError(f"model.teacher: {err}") from err
            network.config.id2label = dict(enumerate(labels))
            network.config.label2id = {name: i for i, name in enumerate(labels)}
        self.network = network.requires_grad_(False).eval()
        self.trust_remote_code = trust_remote_code
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.max_length: int | None = None
        self.precision = "32-true"
        self._forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def tokenizer_for(self, model_name: str):
        """``model_name``'s tokenizer; the teacher's own if it was read from there, so it is read once."""
        path = pretrained.resolve(model_name)
        return self.tokenizer if self.tokenizer.name_or_path == path \
            else pretrained.load_tokenizer(path, trust_remote_code=self.trust_remote_code)

    def prepare(self, device: torch.device, max_length: int,
                forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                precision: str = "32-true"):
        """Run on ``device``, truncating texts to ``max_length`` tokens as the data does; call before
        the methods below. ``forward_context``: the precision context (autocast) for ``logits``; ``precision``:
        the Trainer's name for it (``32-true``, ``bf16-mixed``), part of the cache key."""
        self.network.to(device)
        self.device, self.max_length, self._forward_context = device, max_length, forward_context
        self.precision = precision

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The teacher's inputs for raw ``texts``: (N, T) tensors, padded to the longest, on its device."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}

    @torch.no_grad()
    def outputs(self, texts: list[str], **kwargs):
        """The network's output for raw ``texts`` (``kwargs`` such as ``output_hidden_states`` go to it). With no
        ``kwargs`` only the logits are asked for, so the last layer computes the first token only."""
        with first_token_only(self.network, enabled=not kwargs):
            return self.network(**self.encode(texts), **kwargs)

    def logits(self, texts: list[str]) -> torch.Tensor:
        """(N, C) float logits for raw ``texts`` on the CPU, computed in batches of similar length."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.network.config.num_labels)
        with self._forward_context():
            for start in range(0, len(texts), self.batch_size):
                rows = order[start:start + self.batch_size]
                out[rows] = self.outputs([texts[i] for i in rows]).logits.float().cpu()
        return out

    def cache_file(self, folder: str | Path) -> Path:
        """The cache file in ``folder``, named by a hash of the weights, the tokenizer, ``max_length`` and the
        precision the logits are computed in (bf16 logits differ from fp32 ones in the second decimal)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.network.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(tokenizer_spec(self.tokenizer).encode())
        digest.update(f"max_length={self.max_length}".encode())
        digest.update(f"precision={self.precision}".encode())
        return Path(folder) / f"teacher-{digest.hexdigest()[:16]}.pt"

    def cached_logits(self, texts: Iterable[str], folder: str | Path, write: bool = True) -> torch.Tensor:
        """(N, C) logits for ``texts``: from ``folder``'s cache, computing the missing ones and, if
        ``write``, adding them to it. Under DDP every rank computes the same logits; one writes.

        Raises:
            ValueError: the cache file exists but is not a teacher-logits cache.
        """
        texts = list(texts)
        path = self.cache_file(folder)
        keys = [hashlib.sha1(text.encode()).hexdigest() for text in texts]
        known: dict[str, torch.Tensor] = {}
        if path.exists():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                known = dict(zip(stored["keys"], stored["logits"]))
            except Exception as err:  # truncated or foreign file: unpickling raises many types
                raise ValueError(f"model.logits_cache: cannot read {path} as a teacher-logits cache "
                                 f"({type(err).__name__}); delete it to recompute") from err
        missing = {key: text for key, text in zip(keys, texts) if key not in known}
        if missing:
            known.update(zip(missing, self.logits(list(missing.values()))))
            if write:
                with atomic_file(path, "wb") as f:  # a reader never sees half a file
                    torch.save({"keys": list(known), "logits": torch.stack(list(known.values()))}, f)
        rank_zero_info(f"teacher logits: {len(keys) - len(missing)} of {len(keys)} train texts from {path}, "
                       f"{len(missing)} computed")
        return torch.stack([known[key] for key in keys])


class Distiller(EmotionClassifier):
    """Trains a student (``self.model``) from a frozen, fine-tuned teacher with the classifier's data,
    class weights, metrics and outputs; the loss is ``distillation_losses`` (plus ``patient_loss`` if
    ``hidden_weight > 0``). The teacher is in eval mode, has no gradients, never changes, and is kept
    out of the module tree, so it is not in checkpoints, the optimizer, DDP or the compression callbacks.

    Teacher and student may use different tokenizers: the datamodule tokenizes for the student
    (``data.tokenizer``, linked from ``model_name``) and the teacher tokenizes the raw texts itself. With
    ``logits_cache`` the teacher's logits over the train split are computed once and stored in that folder,
    keyed by the teacher's weights and tokenizer and by each text, so later epochs, resumed runs and other runs
    with the same teacher reuse them; without it the teacher runs on every training batch.

    With ``data.augment`` the train split also holds perturbed copies of its texts (an augmented transfer
    set): the teacher labels them like the gold texts (and caches their logits), and the cross-entropy term
    leaves them out, since a copy may no longer carry its gold label.

    Args:
        teacher: the fine-tuned teacher: an ``hf_model`` export folder, a hub name, or a classifier ``.ckpt``.
            Its labels must be the data's, in any order (matched by name).
        student: ``layers``: a copy of the teacher with only ``student_layers`` kept (DistilBERT-style
            initialisation; ``model_name`` must then be the teacher or share its tokenizer); ``pretrained``:
            ``model_name`` (any HF model) with a fresh head; ``bilstm`` / ``meanpool`` / ``cnn``: a
            ``SmallEncoderClassifier`` over ``model_name``'s tokenizer, learned from scratch.
        student_layers: teacher layers (0-based) a ``layers`` student keeps; default every other one,
            ending with the last (6 layers -> [1, 3, 5]).
        embedding_dim: token embedding width of a ``bilstm``/``meanpool``/``cnn`` student.
        hidden_size: LSTM units per direction (``bilstm``), feed-forward width (``meanpool``) or filters per
            kernel width (``cnn``, kernels of 3, 4 and 5 tokens).
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

    def __init__(self, teacher: str, student: Literal["layers", "pretrained", "bilstm", "meanpool", "cnn"] = "layers",
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
        if hidden_weight > 0 and student in ENCODERS:
            raise ValueError(f"model.hidden_weight needs a transformer student; a {student} student has no layers "
                             "to match, set it to 0")
        if hidden_weight > 0 and logits_cache is not None:
            raise ValueError("model.hidden_weight > 0 needs the teacher's hidden states on every batch, which are "
                             "not cached: set model.logits_cache to null or model.hidden_weight to 0")
        # Before the base class builds the student, which a `layers` student cuts from the teacher. A plain
        # object, not a module: outside the module tree (see Teacher), so not checkpointed, optimized or pruned.
        self._teacher = Teacher(teacher, kwargs.get("id2label"), kwargs.get("trust_remote_code", False),
                                teacher_batch_size)
        self.layer_map = None
        if student == "layers":  # the teacher layers it keeps, which are also its Patient-KD layer map
            self.layer_map = student_layers or every_other_layer(self.teacher.config.num_hidden_layers)
        super().__init__(**kwargs)
        if hidden_weight > 0 and student == "pretrained":
            self.layer_map = _spread_layer_map(self.model, self.teacher)

    @property
    def teacher(self) -> PreTrainedModel:
        """The frozen teacher network (outside the module tree)."""
        return self._teacher.network

    # ---- building: the base class calls this from __init__ ----
    def _build_model(self) -> PreTrainedModel:
        hp = self.hparams
        tokenizer = None if hp.student == "pretrained" else self._teacher.tokenizer_for(hp.model_name)
        if hp.student == "layers" and tokenizer_spec(tokenizer) != tokenizer_spec(self._teacher.tokenizer):
            raise ValueError(f"model.model_name: a 'layers' student reads the teacher's token ids, but "
                             f"{hp.model_name}'s tokenizer differs from {hp.teacher}'s; set model.model_name "
                             "to the teacher")
        if hp.student != "pretrained":  # a pretrained student's builder sets it from its loading report
            # A layers student starts with the teacher's trained head; a small encoder is random throughout.
            self.head_is_new = hp.student in ENCODERS
        return build_student(hp.student, self.teacher, self.id2label, tokenizer=tokenizer, layers=self.layer_map,
                             embedding_dim=hp.embedding_dim, hidden_size=hp.hidden_size,
                             pretrained_builder=super()._build_model)

    @property
    def _needs_teacher(self) -> bool:
        hp = self.hparams
        return hp.alpha < 1 or hp.mse_weight > 0 or hp.hidden_weight > 0

    @property
    def teaches_augmented_texts(self) -> bool:
        """The teacher labels augmented copies, unless it is not run at all (the ``alpha: 1`` control)."""
        return self._needs_teacher

    def on_fit_start(self):
        datamodule = self.trainer.datamodule
        self._teacher.prepare(self.device, datamodule.max_length, self.trainer.precision_plugin.forward_context,
                              str(self.trainer.precision))
        self.train_texts = datamodule.texts("train")
        self.cached_logits = None
        if self._needs_teacher and self.hparams.logits_cache is not None:
            self.cached_logits = self._teacher.cached_logits(self.train_texts, self.hparams.logits_cache,
                                                             write=self.trainer.is_global_zero).to(self.device)

    # ---- training ----
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        hidden = hp.hidden_weight > 0
        with first_token_only(self.model, hp.trim_last_layer and not hidden):  # hidden states need every token
            student = self.model(**model_inputs(batch), output_hidden_states=hidden)
        if not self._needs_teacher:  # the alpha = 1 control: plain weighted cross-entropy
            teacher_logits, teacher_hidden = student.logits.detach(), None
        elif self.cached_logits is not None:
            teacher_logits, teacher_hidden = self.cached_logits[batch["idx"]], None
        else:
            out = self._teacher.outputs([self.train_texts[i] for i in batch["idx"].tolist()],
                                        output_hidden_states=hidden)
            teacher_logits, teacher_hidden = out.logits, out.hidden_states
        labels = batch["labels"]
        if "gold" in batch:  # augmented texts (data.augment) are taught by the teacher alone
            labels = labels.masked_fill(batch["gold"] == 0, -100)
        losses = distillation_losses(student.logits, teacher_logits, labels, self.class_weights,
                                     hp.alpha, hp.temperature, hp.mse_weight)
        if hidden:
            losses["hidden"] = hp.hidden_weight * patient_loss(student.hidden_states, teacher_hidden, self.layer_map)
        loss = torch.stack(list(losses.values())).sum()
        self.log_dict({f"train/{name}": value for name, value in losses.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss
