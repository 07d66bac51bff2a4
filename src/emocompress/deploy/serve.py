"""Predict emotions from an ONNX or OpenVINO artifact folder with only onnxruntime or openvino, tokenizers, numpy.

    pip install onnxruntime tokenizers numpy
    python -m emocompress.deploy.serve logs/teacher_onnx/version_0/onnx --input texts.txt --output predictions.jsonl

The folder is an fp32 export (``OnnxExport``, ``export_onnx``), an ``onnxruntime`` INT8 folder
(``Int8Quantization``) or an ``openvino`` one (``export_openvino``, ``Int8Quantization(backend="openvino")``):
``model.onnx`` (or ``model.xml`` and ``model.bin``), ``tokenizer.json``, ``config.json`` and ``artifact.json``,
whose metadata is checked by ``emocompress.deploy.format.read_metadata``. Nothing here imports torch,
transformers or lightning, so a server needs none of them.

Input is one text per line (stdin by default): a text is what lies between two ``\n`` (one ``\r`` before
the ``\n`` is dropped; a bare ``\r``, U+2028 and the like are part of the text, see ``emocompress.io``),
and ``line`` is its line number in the input. Bytes that are not UTF-8 are replaced with U+FFFD
rather than rejected, so one bad line cannot stop a batch. An empty or blank line is still a text:
it is predicted from the special tokens alone (``[CLS] [SEP]``), which is the model's prior. Texts
longer than the export's ``max_length`` tokens are truncated, as in training (on the ``truncation_side`` of
``tokenizer_config.json``). Output is one JSON object per line: ``{"line": 1, "text": ..., "label": ...,
"probs": {label: p, ...}}``; a text that yields no tokens at all (only with a tokenizer that adds no special tokens)
gets ``"error"`` instead of ``label`` and ``probs``. ``--output`` is written under a temporary name and moved into place
when every line is done, so a crash leaves an earlier output whole; ``--output`` naming the
``--input`` file is refused before anything is written.

Texts are sorted by token count into batches (answers stay in input order): those of each 32 batches of an
``--input`` file together, so batches carry little padding. From stdin, answers are flushed after every batch of
``--batch_size`` lines, so with ``--batch_size 1`` the server is a co-process: one line in, one line out, as each
line arrives. With an ONNX Runtime INT8 folder a line's answer can depend on the lines batched with it (activation
scales per batch): a warning on stderr says so unless ``--batch_size`` is 1. A reader that goes away early
(``| head -1``) ends the server quietly with exit code 141 (128 + SIGPIPE), as ``yes | head -1`` ends ``yes``.
Everything else that stops it before it starts (a missing ``--input``, a folder as ``--output`` or one that cannot
be created, a closed stdin or stdout, a ``tokenizer.json`` or ``model.onnx`` that cannot be read, a tokenizer with
ids past the model's vocabulary, a folder whose runtime is not installed) is one line naming the file and the fix,
with exit code 2.
"""

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from emocompress.deploy.format import FIX, ONNX_FILE, OPENVINO_FILE, TOKENIZER_FILE, read_metadata
from emocompress.deploy.runtime import PRECISION_CHOICES, open_runtime, precision_hint
from emocompress.io import atomic_file, check_can_create, iter_lines


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, computed in float64 after subtracting each row's maximum.

    >>> _softmax(np.array([[0.0, 0.0], [1000.0, 0.0]])).round(3).tolist()
    [[0.5, 0.5], [1.0, 0.0]]
    """
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


# The graph file of each servable backend.
MODEL_FILES = {"onnxruntime": ONNX_FILE, "openvino": OPENVINO_FILE}
# A batch of texts sorted by length is cut where padding would add more than this fraction of its tokens: a
# request of 32 tweets in file order pads 29 tokens per text in one call, 3.7 in the four calls this makes, and the
# teacher's OpenVINO INT8 answers it 1.21-1.37x faster than OpenVINO + NNCF in one call (reports/runtimes, section
# 9); each extra call costs less than the padding it saves, on small models too (reports/http_server).
MAX_PADDING = 0.25
MAX_PADDING_HELP = ("a batch's texts, sorted by length, are cut into model calls whose padding adds at most this "
                    "fraction of their tokens (0: only texts of one length share a call)")


class ArtifactPredictor:
    """Emotion predictions from an ONNX Runtime or OpenVINO artifact folder on the CPU.

    Args:
        folder: the artifact folder (``model.onnx`` or ``model.xml``, ``tokenizer.json``, ``config.json``,
            ``artifact.json``; ``int8.json`` in folders written before it was renamed).
        num_threads: runtime threads (default: all cores).
        batch_size: texts per model call; batches are padded to their longest text.
        sort_by_length: group texts of similar token counts into batches (answers stay in input order), so
            batches carry less padding; False: batches of consecutive texts.
        hint: OpenVINO's performance hint, ``latency`` or ``throughput`` (OpenVINO folders only).
        inference_precision: OpenVINO folders: the precision of the graph's float parts, ``f32`` (the same answers on
            every CPU) or ``bf16``; None: OpenVINO's choice (bf16 on CPUs with AVX512-BF16 or AMX, faster there:
            reports/runtimes, sections 7 and 8).
        max_padding: with ``sort_by_length``, also end a batch before the padding would exceed this fraction of
            its tokens (0.25, the default: a batch computes at most 25% more tokens than its texts hold; 0: only
            texts of one length share a call); None: batches of ``batch_size``. Padding costs as much as tokens,
            and more than a call's own overhead (``MAX_PADDING``).

    Raises:
        ValueError: ``folder`` is not a servable artifact (the message says which file is missing)
            or its metadata is refused (see ``emocompress.deploy.format.read_metadata``; its labels must be as
            many as the graph's outputs, ``check_output_width``).
    """

    def __init__(self, folder: str | Path, num_threads: int | None = None, batch_size: int = 32,
                 sort_by_length: bool = True, hint: str = "latency", max_padding: float | None = MAX_PADDING,
                 inference_precision: str | None = "f32"):
        folder = Path(folder)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_padding is not None and max_padding < 0:
            raise ValueError(f"max_padding must be at least 0 (a fraction of a batch's tokens), got {max_padding}")
        meta = read_metadata(folder)
        if meta.backend not in MODEL_FILES:
            raise ValueError(f"{folder}: a {meta.backend!r} INT8 folder holds no ONNX graph; quantize with "
                             f"Int8Quantization(backend='onnxruntime') (or 'openvino') or {FIX}")
        self.model_file = folder / MODEL_FILES[meta.backend]
        for name in (self.model_file.name, TOKENIZER_FILE):
            if not (folder / name).is_file():
                raise ValueError(f"{folder}: no {name}, so not a servable {meta.backend} artifact; {FIX} "
                                 "(with the datamodule's tokenizer, which writes tokenizer.json)")
        self.labels = meta.labels
        self.max_length = meta.max_length
        self.precision = meta.precision
        self.backend = meta.backend
        self.batch_size = batch_size
        self.sort_by_length = sort_by_length
        self.max_padding = max_padding if sort_by_length else None
        # Of the last ``predict``: texts, their tokens, and the padding tokens their batches added.
        self.padding_stats = {"texts": 0, "tokens": 0, "padded_tokens": 0, "padded_tokens_per_text": 0.0}

        try:
            self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as err:  # tokenizers raises a bare Exception for every unreadable file
            raise ValueError(f"{folder / TOKENIZER_FILE}: not a tokenizers file ({err}); {FIX} "
                             "(with the datamodule's tokenizer, which writes tokenizer.json)") from None
        self.pad_id = 0 if meta.pad_id is None else meta.pad_id
        self.tokenizer.enable_truncation(self.max_length, direction=_tokenizer_side(folder, "truncation_side"))
        # Batches are padded here (_feeds), after grouping texts by length, to the batch's longest text, on the
        # side the model saw in training: the right (which SmallEncoderClassifier needs), unless the tokenizer
        # was saved with padding_side left (absolute positions then count from the padding).
        self.tokenizer.no_padding()
        self.padding_side = _tokenizer_side(folder, "padding_side")

        self.runtime = open_runtime(self.model_file, self.labels, num_threads, hint, inference_precision)
        self._check_vocabulary(folder)

    def _check_vocabulary(self, folder: Path) -> None:
        """Run the tokenizer's highest token id through the graph once: a tokenizer bigger than the model's
        embedding table would otherwise fail (or, on other runtimes, read past the table) only on the texts
        that happen to contain such a token, long after the server started."""
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        probe = {"input_ids": [[size - 1]], "attention_mask": [[1]]}
        try:
            self.runtime.logits({name: np.array(ids, dtype=np.int64) for name, ids in probe.items()})
        except Exception as err:  # the runtimes' errors share no public base class
            raise ValueError(f"{self.model_file}: fails on token id {size - 1}, the last of {TOKENIZER_FILE}'s "
                             f"{size} tokens ({str(err).strip()}); the tokenizer is not the model's: {FIX} "
                             "with the tokenizer the model was trained with") from None

    def predict(self, texts: Iterable[str]) -> list[dict]:
        """Label and class probabilities of each text.

        Args:
            texts: the texts; empty ones are predicted from the special tokens alone.

        Returns:
            One dict per text, in input order: ``{"label": str, "probs": {label: float}}`` (probabilities in
            label id order, summing to 1), or ``{"error": str}`` for a text that yields no tokens.
            ``padding_stats`` then holds the padding tokens the batches added.

        Raises:
            TypeError: ``texts`` is one ``str``, whose characters would each be answered as a text.
        """
        if isinstance(texts, str):
            raise TypeError(f"predict takes a list of texts, got one str ({texts[:40]!r}); pass [text]")
        encodings = self.tokenizer.encode_batch(list(texts))
        results = [{"error": "the text yields no tokens (the tokenizer adds no special tokens)"} for _ in encodings]
        # A text without tokens has nothing to attend to or pool over: its logits would be meaningless.
        rows = [i for i, enc in enumerate(encodings) if enc.ids]
        if self.sort_by_length:
            rows.sort(key=lambda i: len(encodings[i].ids))  # stable: equal lengths keep their order
        tokens = sum(len(encodings[i].ids) for i in rows)
        padded = 0
        for batch in _batches(rows, [len(encodings[i].ids) for i in rows], self.batch_size, self.max_padding):
            feeds = self._feeds([encodings[i] for i in batch])
            padded += feeds["input_ids"].size
            for i, row in zip(batch, _softmax(self.runtime.logits(feeds))):  # (B, C)
                results[i] = {"label": self.labels[int(row.argmax())],
                              "probs": {label: float(p) for label, p in zip(self.labels, row)}}
        self.padding_stats = {"texts": len(results), "tokens": tokens, "padded_tokens": padded - tokens,
                              "padded_tokens_per_text": (padded - tokens) / max(len(results), 1)}
        return results

    def _feeds(self, encodings: list) -> dict[str, np.ndarray]:
        """(B, T) int64 inputs of the encodings, padded to the longest on ``padding_side``."""
        width = max(len(enc.ids) for enc in encodings)
        feeds = {"input_ids": np.full((len(encodings), width), self.pad_id, dtype=np.int64),
                 "attention_mask": np.zeros((len(encodings), width), dtype=np.int64),
                 "token_type_ids": np.zeros((len(encodings), width), dtype=np.int64)}
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            tokens = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            feeds["input_ids"][row, tokens] = enc.ids
            feeds["attention_mask"][row, tokens] = enc.attention_mask
            feeds["token_type_ids"][row, tokens] = enc.type_ids
        return feeds


def _tokenizer_side(folder: Path, key: str) -> str:
    """The side ``transformers`` cut (``key`` ``truncation_side``: ``left`` keeps a text's end) or padded
    (``padding_side``) texts at in training, as the exporter's tokenizer saved it in ``tokenizer_config.json``;
    else ``right``."""
    try:
        side = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):  # no such file (a hand-made folder), or not a JSON object
        return "right"
    return side if side in ("left", "right") else "right"


def _batches(rows: list[int], lengths: list[int], size: int, max_padding: float | None) -> list[list[int]]:
    """``rows`` cut into batches of at most ``size``; with ``max_padding``, a batch also ends before padding its
    texts to the longest (the next, as ``lengths`` ascend) would add more than ``max_padding`` of its tokens.

    >>> _batches([0, 1, 2, 3, 4], [5, 5, 6, 12, 13], size=4, max_padding=0.25)
    [[0, 1, 2], [3, 4]]
    >>> _batches([0, 1, 2, 3, 4], [5, 5, 6, 12, 13], size=4, max_padding=None)
    [[0, 1, 2, 3], [4]]
    """
    batches, tokens = [], 0
    for row, length in zip(rows, lengths):
        if batches and len(batches[-1]) < size and (
                max_padding is None or length * (len(batches[-1]) + 1) <= (1 + max_padding) * (tokens + length)):
            batches[-1].append(row)
            tokens += length
        else:
            batches.append([row])
            tokens = length
    return batches


# Batches of --input lines that ``predict`` sorts by length together.
SORT_WINDOW = 32


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def _same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name one file: the same path spelled differently, a symlink or a hard link."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_streams(args: argparse.Namespace) -> str | None:
    """What stops the server before it loads a model: the one-line error, or None."""
    if args.input and (os.path.isdir(args.input) or not os.path.exists(args.input)):  # a FIFO or device is fine
        what = "is a folder" if os.path.isdir(args.input) else "does not exist"
        return f"--input {args.input} {what}; give a text file with one text per line (or pipe the texts in)"
    if args.input is None and sys.stdin is None:
        return "stdin is closed; pipe the texts in or give --input FILE"
    if args.output and os.path.isdir(args.output):
        return f"--output {args.output} is a folder; give the path of the JSON-lines file to write"
    if args.output and (os.path.isfile(args.output) or not os.path.exists(args.output)):  # a device opens as it is
        try:
            check_can_create(Path(args.output).absolute().parent)  # atomic_file makes the folders below it
        except ValueError as err:
            return f"--output {args.output}: {err}"
    if args.output is None and sys.stdout is None:
        return "stdout is closed; give --output FILE"
    if args.input and args.output and _same_file(args.input, args.output):
        # Opening the output for writing would empty the input before a line is read.
        return f"--output {args.output} is the --input file {args.input}; write the predictions elsewhere"
    return None


def dynamic_int8_warning(predictor: ArtifactPredictor, batch_size: int, flag: str) -> str | None:
    """Why answers may depend on batch mates, or None. ONNX Runtime's dynamic INT8 (the only ORT INT8 that
    ``quantize`` writes) computes each activation scale over the whole batch tensor, so a text's probabilities, even
    its label, can change with the texts batched with it (reports/http_server). OpenVINO's NNCF INT8 has scales fixed
    at calibration, and fp32 has none. ``flag`` is the server's option that sets ``batch_size``."""
    if (predictor.backend, predictor.precision) != ("onnxruntime", "int8") or batch_size == 1:
        return None
    return (f"this ONNX Runtime dynamic INT8 folder computes activation scales per batch, so with {flag} "
            f"{batch_size} a text's answer can depend on the texts batched with it; for answers that "
            f"do not, serve an OpenVINO INT8 folder (fixed scales), an fp32 folder, or {flag} 1")


def add_inference_precision(parser: argparse.ArgumentParser) -> None:
    """``--inference_precision`` of both servers (``ArtifactPredictor``'s ``inference_precision``; ``auto``: None)."""
    parser.add_argument("--inference_precision", choices=PRECISION_CHOICES, default="f32",
                        help="OpenVINO folders: the precision of the float parts; f32 (default) answers alike on every "
                             "CPU; bf16, or auto (OpenVINO's choice: bf16 where the CPU has it), is faster there")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``prog: error: message`` with exit code 2, without the usage
    lines argparse prints before it (``--help`` still shows them); no abbreviated options."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m emocompress.deploy.serve FOLDER [--input FILE] [--output FILE]``: one text per input line,
    one JSON object per output line (see the module docstring). With ``--port`` it is the HTTP server instead
    (``emocompress serve``, ``emocompress.deploy.http``)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--port" or arg.startswith("--port=") for arg in argv):  # over HTTP: emocompress.deploy.http
        from emocompress.deploy.http import main as serve_http

        return serve_http(argv)
    parser = OneLineParser(prog="python -m emocompress.deploy.serve", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="ONNX or OpenVINO artifact folder (OnnxExport, export_onnx, export_openvino, "
                                       "Int8Quantization)")
    parser.add_argument("--input", help="text file, one text per line; stdin if omitted")
    parser.add_argument("--output", help="JSON-lines file to write; stdout if omitted")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="texts per model call; answers are flushed after each batch (1: answer every line "
                             "as it arrives)")
    parser.add_argument("--num_threads", type=int, default=None, help="runtime threads (default: all cores)")
    parser.add_argument("--max_padding", type=float, default=MAX_PADDING, help=MAX_PADDING_HELP)
    add_inference_precision(parser)
    args = parser.parse_args(argv)
    if problem := _check_streams(args):
        parser.error(problem)
    try:
        predictor = ArtifactPredictor(args.folder, args.num_threads, args.batch_size, max_padding=args.max_padding,
                                      inference_precision=precision_hint(args.inference_precision))
    except ValueError as error:
        parser.error(str(error))
    if warning := dynamic_int8_warning(predictor, args.batch_size, "--batch_size"):
        sys.stderr.write(f"{parser.prog}: warning: {warning}\n")  # as the HTTP server warns at startup
    try:
        _serve(predictor, args)
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, as Unix tools do on SIGPIPE. Python would
        # report the failing flush of sys.stdout at exit, so point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + 13)  # 128 + SIGPIPE: the status a shell reports for `yes | head -1`'s `yes`


def _serve(predictor: ArtifactPredictor, args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        # utf-8-sig drops a leading byte-order mark; errors="replace" turns undecodable bytes into U+FFFD;
        # newline="\n": only \n ends a line (emocompress.io), not a bare \r as in universal newlines.
        if args.input:
            reader = stack.enter_context(open(args.input, encoding="utf-8-sig", errors="replace", newline="\n"))
        else:
            sys.stdin.reconfigure(encoding="utf-8-sig", errors="replace", newline="\n")
            reader = sys.stdin
        if args.output and (not os.path.exists(args.output) or os.path.isfile(args.output)):
            # Moved onto args.output only when every line is written: a crash keeps an earlier output whole.
            writer = stack.enter_context(atomic_file(args.output, "w", encoding="utf-8", newline="\n"))
        elif args.output:  # a device or pipe (/dev/stdout, a FIFO): nothing to replace, write through
            writer = stack.enter_context(open(args.output, "w", encoding="utf-8", newline="\n"))
        else:
            sys.stdout.reconfigure(encoding="utf-8", newline="\n")
            writer = sys.stdout
        line_no = 0
        # A file is read SORT_WINDOW batches at a time, so length-sorted batches have texts to choose from; stdin
        # one batch at a time, so a co-process gets each batch's answers as soon as it is complete.
        window = predictor.batch_size * (SORT_WINDOW if args.input else 1)
        for chunk in _chunks(iter_lines(reader), window):
            for text, result in zip(chunk, predictor.predict(chunk)):
                line_no += 1
                writer.write(json.dumps({"line": line_no, "text": text, **result}, ensure_ascii=False) + "\n")
            writer.flush()  # a co-process reads each answer as soon as its batch is done


if __name__ == "__main__":
    main()
