"""An augmented transfer set for distillation (Tang et al. 2019, "Distilling Task-Specific Knowledge from
BERT into Simple Neural Networks", section 3.3), with no external resources.

A small student learns more from the teacher when it sees more texts than the gold set holds: each
training text gets ``copies`` perturbed copies, which the teacher labels (their logits go into the same
cache as the gold texts') and the student learns from its soft labels alone, since a perturbed text may
no longer carry its gold label. Per word, in order (Tang et al.'s rules, their probabilities as defaults):

* masking: with probability ``p_mask`` the word becomes the mask token;
* swapping: else with probability ``p_swap`` it becomes a word drawn uniformly from the words of the
  training texts (their POS-guided replacement, without a POS tagger);
* n-gram sampling: then, with probability ``p_ngram``, only a random window of 1 to ``max_ngram`` words
  of the perturbed text is kept.
"""

import random
from dataclasses import dataclass


@dataclass
class Augmentation:
    """How many perturbed copies of each training text to add, and how they are perturbed.

    Args:
        copies: perturbed copies per training text, >= 1 (Tang et al. used 20 on SST-2).
        p_mask: probability that a word becomes the mask token.
        p_swap: probability that a word (not masked) becomes a random word of the training texts.
        p_ngram: probability that only a window of 1 to ``max_ngram`` words is kept.
        max_ngram: longest window kept by n-gram sampling.
        seed: seed of the perturbations (the copies are the same in every run with this seed).
    """

    copies: int = 4
    p_mask: float = 0.1
    p_swap: float = 0.1
    p_ngram: float = 0.25
    max_ngram: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.copies < 1:
            raise ValueError(f"data.augment.copies must be a positive integer, got {self.copies}")
        for key in ("p_mask", "p_swap", "p_ngram"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"data.augment.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.max_ngram < 1:
            raise ValueError(f"data.augment.max_ngram must be a positive integer, got {self.max_ngram}")


def perturb(words: list[str], rng: random.Random, vocabulary: list[str], mask_token: str,
            augmentation: Augmentation) -> list[str]:
    """One perturbed copy of a text split into ``words`` (see the module docstring).

    >>> a = Augmentation(p_mask=1.0)
    >>> perturb(["i", "feel", "fine"], random.Random(0), ["x"], "[MASK]", a)
    ['[MASK]', '[MASK]', '[MASK]']
    >>> perturb(["i", "feel", "fine"], random.Random(0), ["x"], "[MASK]", Augmentation(p_mask=0, p_swap=1, p_ngram=0))
    ['x', 'x', 'x']
    >>> len(perturb(list("abcdefgh"), random.Random(0), ["x"], "[MASK]", Augmentation(p_mask=0, p_swap=0, p_ngram=1,
    ...                                                                                max_ngram=3))) <= 3
    True
    """
    out = []
    for word in words:
        draw = rng.random()
        if draw < augmentation.p_mask:
            out.append(mask_token)
        elif draw < augmentation.p_mask + (1 - augmentation.p_mask) * augmentation.p_swap:
            out.append(rng.choice(vocabulary))
        else:
            out.append(word)
    if out and rng.random() < augmentation.p_ngram:
        n = rng.randint(1, min(augmentation.max_ngram, len(out)))
        start = rng.randrange(len(out) - n + 1)
        out = out[start:start + n]
    return out


def augmented_texts(texts: list[str], augmentation: Augmentation, mask_token: str) -> tuple[list[str], list[int]]:
    """``augmentation.copies`` perturbed copies of every text of ``texts``, seeded.

    Returns:
        The copies, and for each the index of the text it was made from (copies of text 0 first).

    >>> texts, rows = augmented_texts(["i feel sad", "so happy"], Augmentation(copies=2), "[MASK]")
    >>> rows
    [0, 0, 1, 1]
    >>> texts == augmented_texts(["i feel sad", "so happy"], Augmentation(copies=2), "[MASK]")[0]
    True
    """
    rng = random.Random(augmentation.seed)
    split = [text.split() for text in texts]
    vocabulary = sorted({word for words in split for word in words}) or [mask_token]
    copies, rows = [], []
    for row, words in enumerate(split):
        for _ in range(augmentation.copies):
            copies.append(" ".join(perturb(words, rng, vocabulary, mask_token, augmentation)))
            rows.append(row)
    return copies, rows
