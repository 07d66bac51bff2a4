"""Files in and out: how outputs are written (whole or not at all, never over the current directory, with the
permissions the umask gives) and where a run's go; and what a line of a text file is.

A line is what lies between two ``\\n``; one ``\\r`` before the ``\\n`` is dropped (CRLF files), and every other
character, a bare ``\\r``, ``\\x0b``, ``\\x0c``, ``\\x85`` or ``\\u2028`` included, is part of the line. Line N is
the N-th line an editor shows. Python's universal newlines and ``str.splitlines`` break lines at those other
characters too, so one text would become two and every later line number would shift.

Stdlib only, on purpose: ``emocompress.deploy.serve`` uses it on servers that have only onnxruntime.
"""

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path


def _create_beside(path: Path, create) -> tuple[Path, object]:
    """(name, what ``create(name)`` returned) for a new entry with a unique hidden name beside ``path``: two
    writers never share it, and a crash leaves nothing that looks like a result. ``create`` is a plain
    ``mkdir``/``open`` (0o777/0o666, which the umask then trims), not ``mkdtemp``/``mkstemp``: their 0700/0600
    would make every output unreadable to other users (a server running as another user), whatever the umask.

    Raises:
        FileExistsError: no free name in 100 tries (never in practice: 2^32 names).
    """
    for _ in range(100):
        name = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        try:
            return name, create(name)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name beside {path.name}")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a folder under a temporary name beside ``path`` and move it into place only when the
    ``with`` block ends without an error, replacing an earlier ``path``. On an error the temporary
    folder is removed and ``path`` is left as it was: a reader never sees a half-written folder.

    The caller decides whether ``path`` may be replaced: this removes an existing ``path`` folder, but never the
    current directory or a folder above it (``check_not_cwd``).

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_dir(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("x")
    >>> sorted(p.name for p in root.iterdir()), (root / "out" / "a.txt").read_text()
    (['out'], 'x')
    """
    check_not_cwd(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _create_beside(path, lambda name: os.mkdir(name, 0o777))
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_not_cwd(path: str | Path) -> None:
    """Refuse an output folder that is the current directory or a folder above it, however it is spelled
    (``.``, ``..``, ``../x``, an absolute path, a symlink): replacing an output removes the old folder first,
    which would remove the folder the command runs in. Every command checks its output folders with this
    before computing anything, and ``atomic_dir`` again before it replaces anything.

    Raises:
        ValueError: naming the folder and the fix.
    """
    cwd = Path.cwd().resolve()
    resolved = Path(path).resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"{path}: is the current directory or a folder above it ({resolved}), which an output "
                         "would replace as a whole; choose a new folder for the output, e.g. a subfolder")


def check_folder_name(name: str, key: str) -> None:
    """Refuse an output folder name that is not one plain name inside its parent (a run folder): empty, ``.``,
    ``..`` (``<run>/..`` holds every run of the experiment) or a path.

    Raises:
        ValueError: naming ``key`` and the name.
    """
    if name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"{key} must be a plain folder name, got {name!r}")


def check_can_create(path: str | Path) -> None:
    """Refuse an output folder that cannot be made or written, without creating anything: ``path`` or a folder
    above it is a file, or the nearest of them that exists cannot be written. Commands check this before the work
    whose result goes there; otherwise ``atomic_dir`` (or a logger) fails with a traceback once it is done.

    Raises:
        ValueError: naming ``path``, what is in its way, and the fix.
    """
    path = Path(path)
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{path}: {existing} is a file, so the folder cannot be made there; choose a folder "
                         "that is not (inside) a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: {existing} cannot be written (no permission); choose a folder you can write to")


def check_replaceable(path: str | Path, marker: str, what: str) -> None:
    """Refuse to replace ``path`` unless it is missing, an empty folder, or an earlier output of the same kind
    (a folder holding ``marker``): a folder of anything else is never removed, nor the current directory or a
    folder above it (``check_not_cwd``).

    Raises:
        ValueError: ``path`` is a file, a non-empty folder without ``marker``, or at or above the current directory,
            or cannot be made (``check_can_create``).
    """
    check_not_cwd(path)
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).is_file())):
        raise ValueError(f"{path}: exists and is not {what} (no {marker}), so it is not replaced; "
                         "choose a new or empty folder")
    check_can_create(path)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8", **kwargs) -> Iterator:
    """Open a temporary file beside ``path`` for writing and move it onto ``path`` when the ``with``
    block ends without an error; on an error it is deleted and ``path`` keeps its old content.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_file(target) as f:
    ...     _ = f.write("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name, fd = _create_beside(path, lambda name: os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    if "b" in mode:
        encoding = None
    try:
        with os.fdopen(fd, mode, encoding=encoding, **kwargs) as f:
            yield f
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` in one step (see ``atomic_file``)."""
    with atomic_file(path) as f:
        f.write(text)


def _finite_or_null(value):
    """``value`` with every NaN or infinite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def json_text(value, indent: int | None = 2, **kwargs) -> str:
    """``value`` as strict JSON: a NaN or infinite number (Cohen's kappa of a model that predicts one class) is
    written ``null``, not Python's bare ``NaN``/``Infinity`` tokens, which ``JSON.parse``, jq and other strict
    parsers reject. Readers of our files take ``null`` where a number may be undefined.

    >>> json_text({"kappa": float("nan"), "f1": [0.5, float("inf")]}, indent=None)
    '{"kappa": null, "f1": [0.5, null]}'
    """
    return json.dumps(_finite_or_null(value), indent=indent, allow_nan=False, **kwargs)


def run_dir(trainer) -> Path:
    """The folder of a run's outputs: the logger's version folder, else the Trainer's root dir.

    Under DDP ``trainer.log_dir`` is a collective (rank 0 broadcasts it): every rank must call this.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def split_lines(text: str) -> list[str]:
    """The lines of ``text``; line N is ``split_lines(text)[N - 1]``. A final ``\\n`` ends the last line
    rather than starting an empty one.

    >>> split_lines("a\\rb\\r\\nc\\u2028d\\r\\r\\n\\ne")
    ['a\\rb', 'c\\u2028d\\r', '', 'e']
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def iter_lines(stream: Iterable[str]) -> Iterator[str]:
    """The lines of a text stream opened with ``newline="\\n"`` (so that only ``\\n`` ends a line), as they arrive.

    >>> import io
    >>> list(iter_lines(io.StringIO("a\\rb\\r\\n\\nc", newline="\\n")))
    ['a\\rb', '', 'c']
    """
    for line in stream:
        yield line.removesuffix("\n").removesuffix("\r")
