"""Imbalance handling and batching of the train split: class sizes after oversampling, loss weights, the seeded
oversampled epoch, length grouping, and the sampler that shards it across ranks."""

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch.utils.data import DistributedSampler


def oversampled_counts(counts: Sequence[int], oversample_to: float | None) -> list[int]:
    """Class sizes after raising every class to at least ``oversample_to`` times the largest one.

    >>> oversampled_counts([10, 2, 5], 0.5)
    [10, 5, 5]
    >>> oversampled_counts([10, 2, 5], None)
    [10, 2, 5]
    """
    if oversample_to is None:
        return list(counts)
    target = math.ceil(oversample_to * max(counts))
    return [max(count, target) for count in counts]


def class_weights(counts: Sequence[int], scheme: Literal["none", "inverse", "sqrt_inverse"]) -> torch.Tensor:
    """Loss weights from class sizes: ``inverse`` is ``N / (C * n_c)`` (scikit-learn's "balanced"),
    ``sqrt_inverse`` its square root, ``none`` all ones. A balanced set gets all ones under every scheme.

    >>> class_weights([4, 2], "inverse")
    tensor([0.7500, 1.5000])
    >>> class_weights([4, 1], "sqrt_inverse")
    tensor([0.7906, 1.5811])
    """
    counts_t = torch.tensor(counts, dtype=torch.float)
    if scheme == "none":
        return torch.ones_like(counts_t)
    weights = counts_t.sum() / (len(counts) * counts_t)
    return weights.sqrt() if scheme == "sqrt_inverse" else weights


def oversample_indices(labels: torch.Tensor, counts_after: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Indices of one oversampled epoch: every example once, plus extra draws of small classes.

    A class of ``n`` examples raised to ``target`` gets whole copies of itself first and a random
    subset for the remainder, so no example is repeated more than once beyond any other in its class.

    >>> idx = oversample_indices(torch.tensor([0, 0, 0, 1]), [3, 3], torch.Generator().manual_seed(0))
    >>> idx.tolist()
    [0, 1, 2, 3, 3, 3]
    """
    parts = [torch.arange(len(labels))]
    for label, target in enumerate(counts_after):
        members = (labels == label).nonzero().flatten()
        extra = target - len(members)
        if extra > 0:
            parts.append(members.repeat(extra // len(members)))
            parts.append(members[torch.randperm(len(members), generator=generator)[: extra % len(members)]])
    return torch.cat(parts)


def group_by_length(indices: torch.Tensor, lengths: torch.Tensor, batch_size: int, generator: torch.Generator,
                    chunk_batches: int = 50) -> torch.Tensor:
    """Reorder shuffled ``indices`` so each batch holds texts of similar length, then shuffle the batches.

    Sorting within chunks of ``chunk_batches`` batches (not the whole epoch) keeps batches random
    while cutting padding: emotion texts average 22 tokens but a random batch of 32 pads to about 52.
    Full batches come first in random order; the one short batch, if any, comes last.
    """
    batches = []
    for chunk in indices.split(batch_size * chunk_batches):
        batches.extend(chunk[torch.argsort(lengths[chunk], descending=True, stable=True)].split(batch_size))
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]
    order = torch.randperm(len(full), generator=generator).tolist()
    return torch.cat([full[i] for i in order] + short)


def sort_by_length(lengths: Sequence[int]) -> torch.Tensor:
    """Indices of the texts, longest first (ties in input order): consecutive batches of this order hold texts of
    similar length, so padding each batch to its longest text pads little. For prediction, whose records carry their
    input position and are put back in input order.

    >>> sort_by_length([2, 5, 1, 5]).tolist()
    [1, 3, 0, 2]
    """
    return torch.argsort(torch.as_tensor(lengths), descending=True, stable=True)


def padding_per_text(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Padding tokens per text when the texts are batched ``batch_size`` at a time in ``order``, each batch padded
    to its longest text.

    >>> padding_per_text([1, 5, 1, 5], [0, 1, 2, 3], 2), padding_per_text([1, 5, 1, 5], [1, 3, 0, 2], 2)
    (2.0, 0.0)
    """
    ordered = torch.as_tensor(lengths)[torch.as_tensor(order)]
    padded = sum(int(b.max()) * len(b) - int(b.sum()) for b in ordered.split(batch_size))
    return padded / max(len(ordered), 1)


class EpochSampler(DistributedSampler):
    """This rank's share of one epoch: oversampled, shuffled and grouped by length, all seeded.

    Every rank builds the same global epoch from ``seed + epoch`` and takes every
    ``num_replicas``-th index. With ``even_shards`` (training) the epoch is padded with its own first
    indices to a multiple of ``num_replicas`` so ranks run equal step counts; without it (evaluation)
    each example is seen exactly once across ranks. Being a ``DistributedSampler`` tells Lightning the
    sampler shards itself, so the Trainer neither replaces nor re-wraps it (a wrapper would reshuffle
    and undo the length grouping).

    Args:
        labels: (N,) class id of each example.
        counts_after: class sizes to oversample to (see ``oversampled_counts``); ``None`` keeps the data as is.
        lengths: (N,) token count of each example, to group batches by length (with ``shuffle``: within chunks of
            batches, ``group_by_length``; without: the whole epoch sorted, ``sort_by_length``); ``None`` to skip.
        batch_size: per-rank batch size, used for length grouping.
        shuffle: shuffle the epoch (training) or keep the data order (evaluation).
        even_shards: pad so that every rank gets the same number of examples.
    """

    def __init__(self, labels: Sequence[int], counts_after: Sequence[int] | None = None,
                 lengths: Sequence[int] | None = None, batch_size: int = 1, shuffle: bool = False,
                 even_shards: bool = False, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(range(len(labels)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.labels = torch.as_tensor(labels)
        self.counts_after = counts_after
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.even_shards = even_shards

    def global_epoch(self) -> torch.Tensor:
        """(M,) indices of the whole epoch across all ranks, before sharding."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = torch.arange(len(self.labels))
        if self.counts_after is not None:
            indices = oversample_indices(self.labels, self.counts_after, generator)
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=generator)]
        if self.lengths is not None and self.shuffle:
            indices = group_by_length(indices, self.lengths, self.batch_size * self.num_replicas, generator)
        elif self.lengths is not None:
            indices = indices[sort_by_length(self.lengths[indices])]
        if self.even_shards:
            indices = torch.cat([indices, indices[: -len(indices) % self.num_replicas]])
        return indices

    def __iter__(self):
        return iter(self.global_epoch()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        total = len(self.labels) if self.counts_after is None else sum(self.counts_after)
        if self.even_shards:
            total = math.ceil(total / self.num_replicas) * self.num_replicas
        return len(range(self.rank, total, self.num_replicas))


def class_counts(labels: Sequence[int], id2label: dict[int, str], where: str) -> list[int]:
    """Examples per class id; every class of the label set must have one.

    >>> class_counts([0, 2, 2], {0: "anger", 1: "joy", 2: "love"}, "train.txt")
    Traceback (most recent call last):
    ValueError: train.txt: no train examples of ['joy']; remove them from data.labels or add examples
    """
    counts = torch.bincount(torch.as_tensor(labels), minlength=len(id2label)).tolist()
    missing = [id2label[i] for i, n in enumerate(counts) if n == 0]
    if missing:
        raise ValueError(f"{where}: no train examples of {missing}; remove them from data.labels or add examples")
    return counts


def class_table(names: list[str], before: list[int], after: list[int], weights: list[float]) -> str:
    """The class counts before and after oversampling and the loss weights, as printed before training.

    >>> print(class_table(["joy", "love"], [4, 1], [4, 2], [0.75, 1.5]))
    class         before   after  weight
    joy                4       4   0.750
    love               1       2   1.500
    """
    lines = [f"{'class':<12}{'before':>8}{'after':>8}{'weight':>8}"]
    lines += [f"{name:<12}{n:>8}{m:>8}{w:>8.3f}" for name, n, m, w in zip(names, before, after, weights)]
    return "\n".join(lines)
