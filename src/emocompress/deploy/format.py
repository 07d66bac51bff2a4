"""The on-disk format of an ONNX, OpenVINO or INT8 artifact folder: its file names, its metadata keys, and the
one function that reads and checks a folder's metadata (``read_metadata``), and the check of its labels against
the graph's outputs (``check_output_width``).

Written by ``emocompress.compression.export`` (``export_onnx``, ``quantize``), read by ``emocompress.deploy.serve`` and
``emocompress.models.loading.load_artifact`` (hence the benchmark). Torch-free on purpose: the server imports it
on machines with only onnxruntime and tokenizers.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

# The metadata of every artifact folder, fp32 or INT8 (its "precision" says which).
META_FILE = "artifact.json"
# Its name in folders written before it was renamed (fp32 ones too: the name dates from INT8-only times);
# read like META_FILE.
OLD_META_FILE = "int8.json"
ONNX_FILE = "model.onnx"
# An OpenVINO IR: the graph (XML) and its weights (beside it, same stem).
OPENVINO_FILE = "model.xml"
OPENVINO_WEIGHTS_FILE = "model.bin"
TORCH_WEIGHTS_FILE = "int8_state_dict.pt"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

# Tokens per text when the metadata does not say (folders older than the key, and data.max_length's default).
DEFAULT_MAX_LENGTH = 128
# No text classifier here has more positions; a larger value is a corrupted or hand-edited file.
MAX_LENGTH_LIMIT = 100_000
BACKENDS = ("onnxruntime", "torch", "openvino")
PRECISIONS = ("fp32", "int8")

FIX = ("re-export with emocompress.callbacks.export.OnnxExport, Int8Quantization, "
       "emocompress.compression.export.export_onnx or emocompress.compression.openvino.export_openvino")


@dataclasses.dataclass(frozen=True)
class ArtifactMeta:
    """The metadata of an artifact folder; its field names are the keys of ``artifact.json``.

    Args:
        backend: ``onnxruntime`` (``model.onnx``), ``openvino`` (``model.xml`` and ``model.bin``) or ``torch``
            (``int8_state_dict.pt``).
        precision: ``fp32`` (``export_onnx``) or ``int8`` (``quantize``).
        id2label: label name by class id, ids ``"0"`` to ``"C-1"`` as strings (JSON keys).
        include_embeddings: the embedding tables are INT8 too.
        max_length: tokens per text the server keeps (``onnxruntime`` and ``openvino`` folders).
        input_names: the graph's inputs (``onnxruntime`` and ``openvino`` folders).
        pad_token: the tokenizer's padding token.
        pad_id: its id, below the tokenizer's vocabulary size.
    """

    backend: str
    precision: str
    id2label: dict[str, str]
    include_embeddings: bool = False
    max_length: int | None = None
    input_names: list[str] | None = None
    pad_token: str | None = None
    pad_id: int | None = None

    @property
    def labels(self) -> list[str]:
        """Label names in class id order."""
        return [self.id2label[str(i)] for i in range(len(self.id2label))]

    def to_json(self) -> str:
        """``artifact.json``'s text: the fields that are set."""
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None}, indent=2)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it ({error}); {FIX}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; {FIX}")
    return data


def _label_map(id2label: Any, path: Path) -> dict[str, str]:
    """``id2label`` as ``{"0": name, ...}``, refused unless its keys are exactly the integers 0 to C-1.

    >>> _label_map({"1": "joy", "0": "anger"}, Path("artifact.json"))
    {'0': 'anger', '1': 'joy'}
    """
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError(f"{path}: id2label must be a non-empty object of label names by class id; {FIX}")
    try:
        ids = sorted(int(k) for k in id2label)
    except ValueError:
        ids = None
    if ids != list(range(len(id2label))) or not all(isinstance(v, str) for v in id2label.values()):
        raise ValueError(f"{path}: id2label must map the class ids 0 to {len(id2label) - 1} to label names, got "
                         f"keys {sorted(id2label)}; {FIX} (the model's config.id2label sets it)")
    return {str(i): id2label[k] for i, k in sorted((int(k), k) for k in id2label)}


def _vocab_size(tokenizer_file: Path) -> int:
    """Token ids a ``tokenizer.json`` can produce: its model's vocabulary plus any added tokens."""
    spec = _read_json(tokenizer_file)
    vocab = (spec.get("model") or {}).get("vocab") or {}  # a dict (WordPiece, BPE) or [token, score] pairs (Unigram)
    added = [t.get("id", -1) for t in spec.get("added_tokens") or [] if isinstance(t, dict)]
    return max([len(vocab), *(i + 1 for i in added if isinstance(i, int))])


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def metadata_file(folder: str | Path) -> Path:
    """The metadata file of an artifact folder: its ``artifact.json``, or the ``int8.json`` of a folder written
    before the file was renamed (and no ``artifact.json``). ``folder / META_FILE`` when it has neither, so
    ``metadata_file(folder).is_file()`` tells whether ``folder`` is an artifact folder."""
    folder = Path(folder)
    old = folder / OLD_META_FILE
    return old if old.is_file() and not (folder / META_FILE).is_file() else folder / META_FILE


def read_metadata(folder: str | Path) -> ArtifactMeta:
    """Read and check the metadata of an artifact folder written by ``export_onnx`` or ``quantize``.

    Folders written before the metadata file was renamed (``int8.json``) read the same. Folders written
    before the metadata grew (only ``backend`` and ``include_embeddings``) still load:
    labels come from ``config.json``, padding from its ``pad_token_id``, and ``max_length`` is
    ``DEFAULT_MAX_LENGTH`` (lowered to the model's position limit).

    Returns:
        The metadata with every field a server needs filled in (``max_length`` always set).

    Raises:
        ValueError: ``folder`` is not an artifact folder, or its metadata is refused: ``id2label`` that
            differs from ``config.json``'s or has gaps or non-integer ids, a ``max_length`` that is not
            an integer from 1 to 100000 (and the model's ``max_position_embeddings``), a ``pad_id``
            outside ``tokenizer.json``'s vocabulary, an unknown ``backend`` or ``precision``. The message
            names the file and how to fix it.
    """
    folder = Path(folder)
    meta_file, config_file = metadata_file(folder), folder / CONFIG_FILE
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; {FIX}")
    if not meta_file.is_file():
        raise ValueError(f"{folder}: no {META_FILE}, so not an INT8 model folder or ONNX export; {FIX}")
    if not config_file.is_file():
        raise ValueError(f"{folder}: no {CONFIG_FILE} beside {meta_file.name}; {FIX}")
    meta, config = _read_json(meta_file), _read_json(config_file)

    backend, precision = meta.get("backend"), meta.get("precision", "int8")  # older folders were all INT8
    if backend not in BACKENDS:
        raise ValueError(f"{meta_file}: unknown backend {backend!r}, expected one of {list(BACKENDS)}; {FIX}")
    if precision not in PRECISIONS:
        raise ValueError(f"{meta_file}: unknown precision {precision!r}, expected one of {list(PRECISIONS)}; {FIX}")

    if "id2label" in meta:
        id2label = _label_map(meta["id2label"], meta_file)
        if "id2label" in config and config["id2label"] != id2label:
            raise ValueError(f"{meta_file}: id2label {id2label} differs from {config_file}'s {config['id2label']}; "
                             f"{FIX} (one model, one label map), or fix the file edited by hand")
    elif "id2label" in config:  # folders written before the metadata grew
        id2label = _label_map(config["id2label"], config_file)
    else:
        raise ValueError(f"{folder}: no id2label in {meta_file.name} or {CONFIG_FILE}; {FIX}")

    positions = config.get("max_position_embeddings")
    positions = positions if is_int(positions) and positions > 0 else None
    max_length = meta.get("max_length")
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    elif not is_int(max_length) or not 1 <= max_length <= min(MAX_LENGTH_LIMIT, positions or MAX_LENGTH_LIMIT):
        limit = f"the model's {positions} positions ({config_file})" if positions else MAX_LENGTH_LIMIT
        raise ValueError(f"{meta_file}: max_length {max_length!r} is not an integer from 1 to {limit}; "
                         f"{FIX} (data.max_length or export_onnx's max_length sets it)")

    pad_source = meta_file if "pad_id" in meta else config_file
    pad_id = meta.get("pad_id", config.get("pad_token_id"))
    if pad_id is not None:
        tokenizer_file = folder / TOKENIZER_FILE
        vocab_size = _vocab_size(tokenizer_file) if tokenizer_file.is_file() else None
        if not is_int(pad_id) or pad_id < 0 or (vocab_size is not None and pad_id >= vocab_size):
            raise ValueError(f"{pad_source}: pad_id {pad_id!r} is not a token id of {tokenizer_file} "
                             f"({vocab_size} tokens); {FIX} and the tokenizer the model was trained with")

    include_embeddings = meta.get("include_embeddings", False)
    if not isinstance(include_embeddings, bool):
        raise ValueError(f"{meta_file}: include_embeddings must be true or false, got {include_embeddings!r}; {FIX}")
    return ArtifactMeta(backend=backend, precision=precision, id2label=id2label,
                        include_embeddings=include_embeddings, max_length=max_length,
                        input_names=meta.get("input_names"), pad_token=meta.get("pad_token"), pad_id=pad_id)


