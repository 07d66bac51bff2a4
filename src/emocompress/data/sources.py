"""Reading a text-classification source into validated rows: ``text``, ``label`` (a string) and ``line``.

A source is one of
  * a folder with ``train``/``val``/``test`` files (``.txt`` as ``text;label`` split on the last ``;``,
    or ``.csv``/``.json``/``.jsonl`` with configurable column names);
  * a folder written by ``datasets``' ``save_to_disk``;
  * anything else ``datasets.load_dataset`` accepts: a Hugging Face hub name or a local dataset folder.

Every defect that would silently change what a model learns stops the run with ``file:line`` and the
fix: rows that do not parse, labels that are not scalars, files without rows, and (``check_label_set``)
train labels that are too rare or differ from another only by case or whitespace, the usual traces of
a stray ``;`` or a typo. Texts that occur with conflicting labels are only warned about.
"""

import hashlib
from collections import Counter, defaultdict
from functools import cached_property
from pathlib import Path

import datasets
from lightning.pytorch.utilities import rank_zero_warn

from emocompress.data.files import BUILDERS, load_file

SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}
# Raw splits always hold string labels, whatever the source's label type (ints, ClassLabel ids).
_RAW_FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("string"),
                                   "line": datasets.Value("int64")})
_TEXT_FEATURES = datasets.Features({"text": datasets.Value("string"), "line": datasets.Value("int64")})
_FIX_SOURCE = "give a folder of train/val/test files, a save_to_disk folder or a Hugging Face dataset name"


class DataSource:
    """The splits of one text-classification source, each read once and validated row by row.

    Args:
        data: folder of split files, ``save_to_disk`` folder, or ``datasets.load_dataset`` name.
        text_column: text column of CSV/JSON/hub data.
        label_column: label column of CSV/JSON/hub data.
        max_samples: keep only the first N rows of each split.
    """

    def __init__(self, data: str, text_column: str = "text", label_column: str = "label",
                 max_samples: int | None = None):
        self.data = data
        self.text_column = text_column
        self.label_column = label_column
        self.max_samples = max_samples
        self._read: dict[str, datasets.Dataset] = {}  # by split: the label set needs train before setup does

    def locate(self, split: str) -> tuple[Path | None, str]:
        """The file of ``split`` in a split-file folder (or None) and a name for error messages."""
        folder = Path(self.data)
        if folder.is_dir() and not (folder / "dataset_dict.json").exists():
            for name in SPLIT_NAMES[split]:
                for suffix in BUILDERS:
                    if (folder / f"{name}{suffix}").is_file():
                        return folder / f"{name}{suffix}", str(folder / f"{name}{suffix}")
            if any((folder / f"train{suffix}").is_file() for suffix in BUILDERS):
                expected = " or ".join(f"{n}{{{','.join(BUILDERS)}}}" for n in SPLIT_NAMES[split])
                raise ValueError(f"{folder}: no {split} split; expected a file named {expected}")
        return None, f"{self.data}[{split}]"

    def has_split(self, split: str) -> bool:
        """Whether the source has ``split``, without reading its rows."""
        try:
            path, _ = self.locate(split)
        except ValueError:
            return False
        return path is not None or any(name in self.dataset_dict for name in SPLIT_NAMES[split])

    @cached_property
    def dataset_dict(self) -> datasets.DatasetDict:
        """Hub dataset, local dataset folder or save_to_disk folder, loaded once."""
        source = self.data
        if (Path(source) / "dataset_dict.json").exists():
            try:
                return datasets.load_from_disk(source)
            except (OSError, ValueError) as err:  # else the CLI's OSError report blames model.model_name
                raise ValueError(f"data: {source} has a dataset_dict.json but cannot be loaded as a save_to_disk "
                                 f"folder ({' '.join(str(err).split())}); save it again with "
                                 "DatasetDict.save_to_disk, or remove the dataset_dict.json") from err
        if _looks_like_a_path(source) and not Path(source).expanduser().exists():
            # A hub name is `name` or `owner/name`; this is a local path with a typo, not a dataset to download.
            raise ValueError(f"data: {source} does not exist (resolved to {Path(source).expanduser().absolute()}); "
                             f"{_FIX_SOURCE}")
        try:
            return datasets.load_dataset(source)
        except Exception as err:  # the hub and builders raise many types; all mean the same to the user
            what = ("is a folder without train/val/test files (train.txt, train.csv, ...)" if Path(source).is_dir()
                    else "is no local folder")
            raise ValueError(f"data: {source!r} {what}, and datasets.load_dataset could not load it "
                             f"({' '.join(str(err).split())}); {_FIX_SOURCE} that is reachable") from err

    def read(self, split: str) -> datasets.Dataset:
        """Columns ``text`` (str), ``label`` (str) and ``line`` (where the row came from), validated; read once."""
        if split not in self._read:
            self._read[split] = self._read_split(split)
        return self._read[split]

    def _read_split(self, split: str) -> datasets.Dataset:
        path, where = self.locate(split)
        if path is None:
            available = list(self.dataset_dict)
            name = next((n for n in SPLIT_NAMES[split] if n in available), None)
            if name is None:
                raise ValueError(f"{where}: no {split} split; the dataset has {available}")
            dataset, line_numbers = self.dataset_dict[name], None  # rows of a dataset: numbered from 0
        else:
            dataset, line_numbers = load_file(path)
        is_txt = path is not None and path.suffix == ".txt"
        if self.max_samples:
            end = min(self.max_samples, len(dataset))
            if is_txt:  # a row is a line, and blank lines are no examples: keep the lines up to the N-th text
                filled = [i for i, line in enumerate(dataset["text"]) if line.lstrip("\ufeff").strip()]
                end = filled[self.max_samples - 1] + 1 if len(filled) > self.max_samples else len(dataset)
            dataset = dataset.select(range(end))
        if is_txt:
            dataset = dataset.map(_parse_txt, batched=True, with_indices=True, remove_columns=dataset.column_names,
                                  fn_kwargs={"where": where}, features=_RAW_FEATURES, desc=f"parse {split}")
        else:
            dataset = self._tabular_to_raw(dataset, where, line_numbers)
        if len(dataset) == 0:
            raise ValueError(f"{where}: the {split} split has no examples")
        warn_conflicting_labels(dataset, where)
        return dataset

    def read_texts(self, path: str | Path) -> datasets.Dataset:
        """Columns ``text`` and ``line`` of a file to predict: one text per line of a ``.txt``, or the
        ``text_column`` of a table; blank texts are skipped."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"data.predict_file: {path} does not exist")
        if path.suffix not in BUILDERS:
            raise ValueError(f"data.predict_file: {path} must end in one of {list(BUILDERS)}")
        try:
            raw, line_numbers = load_file(path)
        except ValueError as err:
            raise ValueError(f"data.predict_file: {err}") from None
        column = "text" if path.suffix == ".txt" else self.text_column
        if column not in raw.column_names:
            raise ValueError(f"{path}: no column {column!r}; the columns are {raw.column_names}; set data.text_column")
        raw = raw.map(_parse_text_lines, batched=True, with_indices=True, remove_columns=raw.column_names,
                      fn_kwargs={"where": str(path), "column": column, "line_numbers": line_numbers},
                      features=_TEXT_FEATURES)  # not the input's: a datasets.Json column would decode "42" to 42
        if len(raw) == 0:
            raise ValueError(f"data.predict_file: {path} has no texts (every line or {column!r} is blank); "
                             "give a file with one text per line")
        return raw

    def _tabular_to_raw(self, dataset: datasets.Dataset, where: str, line_numbers: list[int] | None
                        ) -> datasets.Dataset:
        text_col, label_col = self.text_column, self.label_column
        for key, column in (("text_column", text_col), ("label_column", label_col)):
            if column not in dataset.column_names:
                raise ValueError(f"{where}: no column {column!r}; the columns are {dataset.column_names}; "
                                 f"set data.{key} to the right one")
        feature = dataset.features[label_col]
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        return dataset.map(_parse_row, batched=True, with_indices=True, remove_columns=dataset.column_names,
                           fn_kwargs={"where": where, "line_numbers": line_numbers, "text_col": text_col,
                                      "label_col": label_col, "names": names},
                           features=_RAW_FEATURES, desc=f"parse {where}")


def split_fingerprint(source: DataSource, split: str) -> dict:
    """What identifies the data of ``split`` without keeping it: its file's path, size and SHA-256 (one read of
    the bytes), or for hub and ``save_to_disk`` data the ``datasets`` fingerprint of the split. A resume compares
    it with the run's record to notice data edited in place."""
    path, where = source.locate(split)
    if path is None:
        name = next(n for n in SPLIT_NAMES[split] if n in source.dataset_dict)
        return {"source": where, "datasets_fingerprint": source.dataset_dict[name]._fingerprint}
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_label_set(raw: datasets.Dataset, where: str, min_count: int) -> list[str]:
    """The sorted label set of a train split, refusing labels that look like mistakes.

    Raises:
        ValueError: two labels differ only by case or whitespace (``Joy`` and ``joy``), or a label occurs
            fewer than ``min_count`` times; the message names the first row of the suspect label.
    """
    counts = Counter(raw["label"])
    first_line: dict[str, int] = {}
    for label, line in zip(raw["label"], raw["line"]):
        first_line.setdefault(label, line)
    variants = defaultdict(list)
    for label in counts:
        variants["".join(label.split()).casefold()].append(label)
    for group in variants.values():
        if len(group) > 1:
            common, odd = sorted(group, key=lambda label: (-counts[label], first_line[label]))[:2]
            raise ValueError(f"{where}:{first_line[odd]}: label {odd!r} differs from {common!r} only by case or "
                             f"whitespace; fix the row(s), or list both in data.labels to keep them as two classes")
    rare = sorted((label for label in counts if counts[label] < min_count), key=first_line.get)
    if rare:
        label = rare[0]
        raise ValueError(f"{where}:{first_line[label]}: label {label!r} occurs only {counts[label]} time(s) in the "
                         f"train split (data.min_label_count is {min_count}), the trace of a typo or a stray ';'; "
                         "fix the row, or add the label to data.labels (or lower data.min_label_count) to keep it")
    return sorted(counts)


def warn_conflicting_labels(raw: datasets.Dataset, where: str, shown: int = 3) -> int:
    """Warn about texts that occur more than once with different labels; return how many there are."""
    labels_of: dict[str, dict[str, int]] = defaultdict(dict)
    for text, label, line in zip(raw["text"], raw["label"], raw["line"]):
        labels_of[text].setdefault(label, line)
    conflicts = [rows for rows in labels_of.values() if len(rows) > 1]
    if conflicts:
        examples = "; ".join(", ".join(f"{where}:{line} {label!r}" for label, line in rows.items())
                             for rows in conflicts[:shown])
        rank_zero_warn(f"{where}: {len(conflicts)} text(s) occur with conflicting labels (kept as they are), "
                       f"e.g. {examples}; deduplicate or fix them if they are mistakes")
    return len(conflicts)


def warn_shared_texts(first: datasets.Dataset, first_where: str, second: datasets.Dataset, second_where: str) -> int:
    """Warn, in one line, about texts of ``second`` that are also in ``first`` (two splits); return how many. Not an
    error: real data sets have such duplicates (dair-ai/emotion's test split shares 11 texts with train), but a
    score on them is not a score on unseen texts."""
    line_of: dict[str, int] = {}
    for text, line in zip(first["text"], first["line"]):
        line_of.setdefault(text, line)
    shared = {text: line for text, line in zip(second["text"], second["line"]) if text in line_of}
    if shared:
        text, line = next(iter(shared.items()))
        rank_zero_warn(f"{second_where}: {len(shared)} text(s) also in {first_where} (kept), e.g. {second_where}:"
                       f"{line} = {first_where}:{line_of[text]} {text[:80]!r}; scores on them are not on unseen "
                       "texts; deduplicate the splits if that matters")
    return len(shared)


def _looks_like_a_path(source: str) -> bool:
    """``./x``, ``/x``, ``~/x``, ``a/b/c`` or ``x.csv`` are paths; ``emotion`` and ``owner/name`` may be hub names.

    >>> [_looks_like_a_path(s) for s in ("../data/emotion", "dair-ai/emotion", "emotion", "data/a/b", "x.csv")]
    [True, False, False, True, True]
    """
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or Path(source).suffix in BUILDERS


# ---- dataset.map functions (module level, so datasets can hash them for its cache) ----
def _parse_txt(batch, indices, where):
    """``text;label`` lines -> text, label, line; blank lines are skipped."""
    out = {"text": [], "label": [], "line": []}
    for raw, i in zip(batch["text"], indices):
        line_no = i + 1
        line = raw.lstrip("\ufeff").strip()
        if not line:
            continue
        text, sep, label = line.rpartition(";")
        if not sep:
            raise ValueError(f"{where}:{line_no}: no ';' separating text and label; each line must be 'text;label'")
        if not text.strip():
            raise ValueError(f"{where}:{line_no}: empty text before ';'; remove the line or add its text")
        if not label.strip():
            raise ValueError(f"{where}:{line_no}: empty label after ';'; each line must be 'text;label'")
        out["text"].append(text.strip())
        out["label"].append(label.strip())
        out["line"].append(line_no)
    return out


def _label_string(label, where: str, label_col: str) -> str:
    """A label as the string the label set uses: strings stripped, integers (and integral floats, which
    a JSON column mixing ints and floats is read as) in decimal; anything else is refused."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"{where}: {label_col!r} is {label!r}, a {type(label).__name__}; a label must be one "
                         "string or integer (for several labels per text, keep one row per label you train on)")
    return str(label).strip()


def _text_string(text, where: str, text_col: str) -> str:
    """A text, stripped. Only a string: a JSON number, list or object would be trained on (or predicted) as its
    Python spelling (``['a', 'b']``), and a number in a predict file stopped the tokenizer with a traceback."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: {text_col!r} is {text!r:.60}, a {type(text).__name__}; a text must be a string "
                         "(in JSON, in double quotes); fix the row, or set data.text_column to the column of texts")
    return text.strip()


def _class_name(label: int, names: list[str], where: str, label_col: str) -> str:
    """The name of a ``ClassLabel`` id. -1 is datasets' mark of a row without a label (a hidden test split), which
    Python's indexing would turn into the last class: scored against it, or trained on it."""
    if not 0 <= label < len(names):
        raise ValueError(f"{where}: {label_col!r} is {label}, which names no class (its ClassLabel has ids 0 to "
                         f"{len(names) - 1}; -1 marks a row without a label); use a split with labels, or give the "
                         "texts to predict as data.predict_file")
    return names[label]


def _parse_row(batch, indices, where, line_numbers, text_col, label_col, names):
    """Rows of a table -> text, label (as str; ClassLabel ids become their names), line (``line_numbers[i]``,
    or the row index where there are no lines)."""
    out = {"text": [], "label": [], "line": []}
    for text, label, i in zip(batch[text_col], batch[label_col], indices):
        line_no = i if line_numbers is None else line_numbers[i]
        if text is None or not str(text).strip():
            raise ValueError(f"{where}:{line_no}: empty {text_col!r}; remove the row or add its text")
        if label is None or not str(label).strip():
            raise ValueError(f"{where}:{line_no}: empty {label_col!r}; every row needs a label")
        out["text"].append(_text_string(text, f"{where}:{line_no}", text_col))
        out["label"].append(_label_string(label, f"{where}:{line_no}", label_col) if names is None
                            else _class_name(label, names, f"{where}:{line_no}", label_col))
        out["line"].append(line_no)
    return out


def _parse_text_lines(batch, indices, where, column, line_numbers):
    """One text per line or row -> text, line (``line_numbers[i]``); blank texts are skipped."""
    kept = [(_text_string(t, f"{where}:{line_numbers[i]}", column).lstrip("\ufeff").strip(), line_numbers[i])
            for t, i in zip(batch[column], indices) if t is not None and str(t).strip("\ufeff \t\r")]
    return {"text": [t for t, _ in kept], "line": [i for _, i in kept]}
