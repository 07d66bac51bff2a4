"""Reading one split or predict file (``.txt``, ``.csv``, ``.json``, ``.jsonl``) into rows, with the physical line
(``emocompress.io.split_lines``) each row starts on; ``emocompress.data.sources`` validates the rows.

Refused here, with the file and line: bytes that are not UTF-8, a file without rows, a CSV row with more cells than
its header or a quoted field that never closes, and JSON rows that are not objects or name a key twice.
"""

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
import pandas as pd

from emocompress.io import split_lines

BUILDERS = {".txt": "text", ".csv": "csv", ".jsonl": "json", ".json": "json"}


def load_file(path: Path) -> tuple[datasets.Dataset, list[int]]:
    """The rows of a split or predict file and the physical line (``emocompress.io``) each row starts on."""
    text = _check_content(path)
    lines = split_lines(text.removeprefix("\ufeff"))
    if path.suffix == ".txt":  # every line is a row, blank ones too (skipped later, keeping the numbering)
        return datasets.Dataset.from_dict({"text": lines}), list(range(1, len(lines) + 1))
    if path.suffix == ".csv":
        dataset = datasets.Dataset.from_pandas(_read_csv(path, lines), preserve_index=False)
        numbers = _csv_row_lines(lines)[1:]  # the first row is the header
    elif (rows := _json_rows(path, text)) is not None:
        # Every value as written: a column of strings as strings, any other as datasets.Json (one of mixed types
        # too). datasets' own reader failed on a file with blank lines and a column of mixed types (an int label
        # beside string ones): "Expected object or value", with no line.
        columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(key for row in rows for key in row)}
        dataset = datasets.Dataset.from_dict(columns, features=datasets.Features({
            key: datasets.Value("string") if all(v is None or isinstance(v, str) for v in values) else datasets.Json()
            for key, values in columns.items()}))
        numbers = _json_row_lines(lines)
    else:
        try:
            dataset = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")
        except Exception as err:  # a malformed file surfaces as one of several pyarrow/datasets errors
            raise _unreadable(path, err) from err
        numbers = list(range(1, len(dataset) + 1))
    if len(numbers) != len(dataset):  # a JSON array: rows are its items, not lines
        numbers = list(range(1, len(dataset) + 1))
    return dataset, numbers


def _read_csv(path: Path, lines: list[str]) -> pd.DataFrame:
    """The rows of a CSV file under its header. pandas directly, on the lines joined by \\n alone: its reader (and
    datasets' csv builder) would also end a row at a bare \\r. Cells are the strings written there ("007", "NA" and
    "null" stay as they are; pandas' default would make the last two empty); a missing cell is empty.

    The header is read as a row (``header=None``): a row with more cells than the header (an unquoted comma in a
    text) is then refused with its line, where pandas would take the first column of every row as an index and
    shift the others left (the label read as the text) when the first data row has one cell too many."""
    kinds = list(_csv_line_kinds(lines))  # pandas numbers the lines outside quoted fields, blank ones included
    try:
        frame = pd.read_csv(io.StringIO("\n".join(_csv_without_blank_lines(lines))), lineterminator="\n",
                            dtype=str, header=None, keep_default_na=False, na_values=[])
    except pd.errors.ParserError as err:
        if found := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err)):
            header, line, seen = map(int, found.groups())
            raise ValueError(f"{path}:{kinds[line - 1][0]}: {seen} cells where the header has {header}; put a text "
                             'that holds a comma in double quotes ("so, happy"), or fix the row') from None
        if "EOF inside string" in str(err):
            line = max(number for number, starts_row in kinds if starts_row)
            raise ValueError(f"{path}:{line}: a quoted field opens here and never closes; add the closing '\"' "
                             '(a quote inside a quoted field is written twice: "say ""hi""")') from None
        raise _unreadable(path, err) from err
    # the header line of a \r\r\n file keeps its \r; unnamed columns get pandas' names
    header = [name.rstrip("\r") or f"Unnamed: {i}" for i, name in enumerate(frame.iloc[0])]
    if repeated := sorted({name for name in header if header.count(name) > 1}):
        raise ValueError(f"{path}:{_csv_row_lines(lines)[0]}: the header names the column(s) {repeated} more than "
                         "once; give every column its own name")
    return frame.iloc[1:].set_axis(header, axis=1)


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path}: could not be read as {path.suffix[1:]} ({' '.join(str(err).split())}); "
                      "fix the file's format")


def _check_content(path: Path) -> str:
    """The text of ``path``. Refuse, with a place, what ``datasets`` reports without one: bytes that are not
    UTF-8 and a file with no rows."""
    try:
        data = path.read_bytes()
    except OSError as err:  # else the CLI's OSError report blames model.model_name
        raise ValueError(f"{path}: cannot be read ({err.strerror}); make it readable") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}:{line_no}: byte 0x{data[err.start]:02x} at column {column} is not UTF-8; "
                         "save the file as UTF-8") from None
    lines = [line for line in split_lines(text.lstrip("\ufeff")) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: the file is empty; add rows or remove the file")
    if path.suffix == ".csv" and len(lines) == 1:
        raise ValueError(f"{path}: the file has a header row and no data rows; add rows below the header")
    return text


def _json_rows(path: Path, text: str) -> list[dict] | None:
    """The rows of a JSON-lines file (or the items of a JSON array), each refused with its line unless it is an
    object with keys that differ; None for a file of one JSON object, which ``datasets`` reads as one row (of
    ``{"data": [...]}`` a row with a column ``data``, which the column check refuses)."""
    text = text.lstrip("\ufeff")
    try:
        document = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError:
        document = None  # JSON lines: checked line by line below
    except _RepeatedKey as err:
        raise ValueError(f"{path}: {err}") from None
    if isinstance(document, list):
        if not document:
            raise ValueError(f"{path}: the JSON array is empty; add rows or remove the file")
        rows = [(f"{path}: item {i}", row) for i, row in enumerate(document)]
    elif isinstance(document, dict):
        return None
    else:
        rows = []
        for line_no, line in enumerate(split_lines(text), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{line_no}", json.loads(line, object_pairs_hook=_object)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}); each line must be one JSON "
                                 'object such as {"text": "...", "label": "..."}') from None
            except _RepeatedKey as err:
                raise ValueError(f"{path}:{line_no}: {err}") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a JSON {type(row).__name__}, not an object; each row must be one JSON "
                             'object such as {"text": "...", "label": "..."}')
    return [row for _, row in rows]


class _RepeatedKey(ValueError):
    pass


def _object(pairs: list[tuple]) -> dict:
    """A JSON object whose keys differ: of ``{"label": "joy", "label": "anger"}`` Python keeps the last silently."""
    keys = [key for key, _ in pairs]
    if repeated := sorted({key for key in keys if keys.count(key) > 1}):
        raise _RepeatedKey(f"an object names the key(s) {repeated} more than once; keep one value for each key")
    return dict(pairs)


def _json_row_lines(lines: list[str]) -> list[int]:
    """The line of each row of a JSON-lines file: its non-blank lines (datasets skips the blank ones)."""
    return [number for number, line in enumerate(lines, start=1) if line.strip()]


def _csv_row_lines(lines: list[str]) -> list[int]:
    """The line each row of a CSV file (header included) starts on: a field that starts with ``"`` runs to the
    next lone ``"``, across lines (the rules of pandas' reader); blank lines outside such fields are no rows.

    >>> _csv_row_lines(['text,label', '', '"two', 'lines, ""quoted"" too",joy', 'a"b,joy', ' \\r'])
    [1, 3, 5]
    """
    return [number for number, starts_row in _csv_line_kinds(lines) if starts_row]


def _csv_without_blank_lines(lines: list[str]) -> list[str]:
    """``lines`` with the blank ones outside quoted fields emptied: pandas skips only empty lines and lines of
    spaces and tabs, a line of ``\\r`` (from ``\\r\\r\\n``) or other white space would be a row of empty cells."""
    kinds = dict(_csv_line_kinds(lines))
    return ["" if kinds.get(number) is False else line for number, line in enumerate(lines, start=1)]


def _csv_line_kinds(lines: list[str]) -> Iterator[tuple[int, bool]]:
    """(line number, whether it starts a row) for every line outside a quoted field: True for a row's first line,
    False for a blank line; the lines that continue a quoted field are left out."""
    quoted = False
    for number, line in enumerate(lines, start=1):
        if not quoted:
            yield number, bool(line.strip())
            if not line.strip():
                continue
        field_start, closing = True, False  # at the start of a field; just after a " inside a quoted field
        for char in line:
            if quoted:
                if closing and char != '"':
                    quoted = closing = False  # the quoted part ended; pandas keeps the rest of the field
                else:
                    closing = not closing if char == '"' else False
                    continue
            if char == ",":
                field_start = True
            else:
                quoted, field_start = field_start and char == '"', False
        if closing:
            quoted = False  # the line ended right after a closing "
