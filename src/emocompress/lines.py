"""What a line is, for every file of texts the project reads (split files, predict files, the server's input).

A line is what lies between two ``\\n``; one ``\\r`` before the ``\\n`` is dropped (CRLF files), and every other
character, a bare ``\\r``, ``\\x0b``, ``\\x0c``, ``\\x85`` or ``\\u2028`` included, is part of the line. Line N is
the N-th line an editor shows. Python's universal newlines and ``str.splitlines`` break lines at those other
characters too, so one text would become two and every later line number would shift.

Torch-free on purpose (stdlib only): ``emocompress.serve`` uses it on servers that have only onnxruntime.
"""

from collections.abc import Iterable, Iterator


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
