"""Vocabulary pruning of a transformer classifier (TextPruner's idea, Yang et al. 2022): keep only the rows of the
word-embedding table whose tokens occur in the train texts (plus the special tokens and an optional extra corpus),
and renumber the tokenizer's WordPiece vocabulary to match.

A 30,522-token BERT vocabulary is about half of a MiniLM's parameters, and one data set reads a fraction of it.
WordPiece picks the longest piece of the vocabulary at each position of a word, so a text whose pieces are all kept
is split exactly as before and gets the same logits (with the renumbered ids). A word with a piece that was not kept
is split again from the kept pieces, or becomes ``[UNK]`` when they cannot spell it: ``coverage`` counts both.

The pruned model is an ordinary ``transformers`` model with a smaller ``config.vocab_size``, and the pruned tokenizer
an ordinary tokenizer folder (``tokenizer.json``), so ``save_pretrained`` of both is loadable by
``emocompress.models.pretrained.load_model``, exportable to ONNX/INT8 and servable by ``emocompress.deploy.serve``.
"""

import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from emocompress.compression.export import datamodule_max_length
from emocompress.io import atomic_write_text, json_text, run_dir, split_lines

log = logging.getLogger(__name__)


def kept_ids(tokenizer, texts: list[str], extra_texts: list[str] | None = None, min_count: int = 1) -> list[int]:
    """The ids to keep, in their old order: every special and added token, the tokens seen at least ``min_count``
    times in ``texts``, and every token of ``extra_texts`` (however rare).

    >>> from transformers import BertTokenizerFast
    >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]
    >>> kept_ids(BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}), ["a a b"], min_count=2)
    [0, 1, 2, 3, 4, 5]
    """
    counts = Counter(i for row in _token_ids(tokenizer, texts) for i in row)
    keep = {i for i, n in counts.items() if n >= min_count}
    keep |= {i for row in _token_ids(tokenizer, extra_texts or []) for i in row}
    keep |= set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return sorted(keep)


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text, without special tokens or truncation (a pruned vocabulary serves any length)."""
    return tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"] if texts else []


def prune_vocabulary(model: nn.Module, tokenizer, texts: list[str], extra_texts: list[str] | None = None,
                     min_count: int = 1) -> tuple[nn.Module, object, dict]:
    """Keep the embedding rows and vocabulary entries of the tokens of ``texts`` (see ``kept_ids``), in place for
    the model.

    Args:
        model: a ``transformers`` classifier whose input embeddings are an ``nn.Embedding`` over ``tokenizer``'s ids
            (BERT, RoBERTa-free WordPiece models: BERT, DistilBERT, MiniLM, ...); changed in place.
        tokenizer: its fast tokenizer, with a WordPiece vocabulary (``tokenizer.json``); not changed.
        texts: the train texts.
        extra_texts: more texts whose tokens are kept (a corpus of the texts the model will serve).
        min_count: keep a token of ``texts`` only if it occurs at least this often (1: every token); rarer words are
            then split into kept pieces or become ``[UNK]``.

    Returns:
        (the model, with the smaller table and ``config.vocab_size``; a new tokenizer with the renumbered
        vocabulary; stats: ``vocab_size_before``, ``kept_tokens``, ``params_before``, ``params_after``, ``texts``,
        ``extra_texts``, ``min_count``).

    Raises:
        ValueError: the tokenizer is not a fast WordPiece tokenizer, or the model's input embeddings are not an
            ``nn.Embedding`` of the tokenizer's size.
    """
    if min_count < 1:
        raise ValueError(f"prune_vocabulary: min_count must be a positive integer, got {min_count}")
    spec = _wordpiece_spec(tokenizer)
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding) or embedding.num_embeddings < len(tokenizer):
        raise ValueError(f"prune_vocabulary: {type(model).__name__}'s input embeddings ({type(embedding).__name__}) "
                         f"are not a table over the tokenizer's {len(tokenizer)} ids; prune a transformer's vocabulary")
    params_before = sum(p.numel() for p in model.parameters())
    keep = kept_ids(tokenizer, texts, extra_texts, min_count)
    new_id = {old: new for new, old in enumerate(keep)}
    pruned_tokenizer = _renumbered_tokenizer(tokenizer, spec, {tokenizer.convert_ids_to_tokens(i): new_id[i]
                                                               for i in keep})
    _keep_rows(model, embedding, keep, new_id)
    stats = {"vocab_size_before": embedding.num_embeddings, "kept_tokens": len(keep), "params_before": params_before,
             "params_after": sum(p.numel() for p in model.parameters()), "texts": len(texts),
             "extra_texts": len(extra_texts or []), "min_count": min_count}
    return model, pruned_tokenizer, stats


def _wordpiece_spec(tokenizer) -> dict:
    """``tokenizer.json`` as a dict, refused unless its model is WordPiece: a BPE vocabulary (RoBERTa, GPT-2) would
    also need its merges pruned, which this does not do."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    kind = spec.get("model", {}).get("type")
    if kind != "WordPiece":
        raise ValueError(f"prune_vocabulary: {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has a "
                         f"{kind or 'slow (Python)'} tokenizer; vocabulary pruning rewrites a fast WordPiece "
                         "vocabulary (BERT, DistilBERT, MiniLM): remove VocabularyPruning for this model")
    return spec


def _renumbered_tokenizer(tokenizer, spec: dict, vocab: dict[str, int]):
    """``tokenizer`` with ``vocab`` (token -> new id) in its ``tokenizer.json``: its WordPiece model, its added
    tokens and its post-processor's ``[CLS]``/``[SEP]`` ids, saved and loaded back the way every later reader loads
    it, so the object returned and the folder a run exports are the same tokenizer."""
    from transformers import AutoTokenizer

    spec["model"]["vocab"] = vocab
    for token in spec.get("added_tokens", []):
        token["id"] = vocab[token["content"]]
    _renumber_post_processor(spec.get("post_processor"), vocab)
    with tempfile.TemporaryDirectory(prefix="emocompress-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        vocab_txt = Path(tmp, "vocab.txt")  # the slow tokenizer's copy of the vocabulary, where one is written
        if vocab_txt.is_file():
            vocab_txt.write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
        pruned = AutoTokenizer.from_pretrained(tmp)
    pruned.name_or_path = tokenizer.name_or_path  # where it came from: the pruned one lives in memory until exported
    return pruned


def _renumber_post_processor(processor: dict | None, vocab: dict[str, int]) -> None:
    """The special-token ids a post-processor adds (TemplateProcessing, BertProcessing, or a Sequence of them)."""
    if not processor:
        return
    for inner in processor.get("processors", []):
        _renumber_post_processor(inner, vocab)
    for entry in processor.get("special_tokens", {}).values():
        entry["ids"] = [vocab[token] for token in entry["tokens"]]
    for key in ("cls", "sep"):  # BertProcessing: [token, id]
        if isinstance(processor.get(key), list):
            processor[key][1] = vocab[processor[key][0]]


def _keep_rows(model: nn.Module, embedding: nn.Embedding, keep: list[int], new_id: dict[int, int]) -> None:
    """Replace ``model``'s input embeddings by their rows ``keep`` and renumber the token ids its config names."""
    pad = embedding.padding_idx
    table = nn.Embedding(len(keep), embedding.embedding_dim, padding_idx=None if pad is None else new_id[pad],
                         device=embedding.weight.device, dtype=embedding.weight.dtype)
    with torch.no_grad():
        table.weight.copy_(embedding.weight[torch.tensor(keep, device=embedding.weight.device)])  # (V, H) -> (K, H)
    table.weight.requires_grad_(embedding.weight.requires_grad)  # frozen embeddings stay frozen
    model.set_input_embeddings(table)
    config = model.config
    config.vocab_size = len(keep)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, new_id.get(value))


def trim_positions(model: nn.Module, tokenizer, max_positions: int) -> int:
    """Keep the first ``max_positions`` rows of ``model``'s absolute position embeddings (the rest are never read
    when every text is truncated to that many tokens), and cap ``tokenizer.model_max_length`` to match; both in place.

    Args:
        model: a ``transformers`` model whose ``base_model.embeddings.position_embeddings`` is an ``nn.Embedding``
            (BERT, DistilBERT, MiniLM).
        tokenizer: its tokenizer; saved with the model, it truncates to ``max_positions`` by default.
        max_positions: rows to keep, at least the longest input the model will see (``data.max_length``).

    Returns:
        The number of parameters removed (0 when the table already has at most ``max_positions`` rows).

    Raises:
        ValueError: ``max_positions`` is not positive, or the model has no absolute position table.
    """
    if max_positions < 1:
        raise ValueError(f"trim_positions: max_positions must be a positive integer, got {max_positions}")
    embeddings = getattr(model.base_model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        raise ValueError(f"trim_positions: {type(model).__name__} has no absolute position table "
                         "(base_model.embeddings.position_embeddings); leave max_positions null for this model")
    rows = table.num_embeddings
    if rows <= max_positions:
        return 0
    with torch.no_grad():  # (P, H) -> (max_positions, H)
        table.weight = nn.Parameter(table.weight[:max_positions].clone(), requires_grad=table.weight.requires_grad)
    table.num_embeddings = max_positions
    for name, buffer in list(embeddings.named_buffers(recurse=False)):  # position_ids, token_type_ids: (1, P)
        if buffer.dim() == 2 and buffer.shape[-1] == rows:
            setattr(embeddings, name, buffer[:, :max_positions].clone())
    model.config.max_position_embeddings = max_positions
    tokenizer.model_max_length = max_positions
    return (rows - max_positions) * table.embedding_dim


def coverage(tokenizer, pruned_tokenizer, texts: list[str]) -> dict:
    """How ``texts`` (say, the test split) fare with the pruned vocabulary.

    Returns:
        ``tokens``: tokens of ``texts`` under ``tokenizer``; ``outside_tokens`` (and ``outside_rate``): how many of
        them are not in the pruned vocabulary; ``texts_changed``: texts the pruned tokenizer splits otherwise;
        ``unk_before``/``unk_after``: ``[UNK]`` pieces under each tokenizer (a word the kept pieces cannot spell is
        one ``[UNK]``).
    """
    kept = set(pruned_tokenizer.get_vocab())
    before = [tokenizer.convert_ids_to_tokens(row) for row in _token_ids(tokenizer, texts)]
    after = [pruned_tokenizer.convert_ids_to_tokens(row) for row in _token_ids(pruned_tokenizer, texts)]
    tokens = sum(len(row) for row in before)
    outside = sum(token not in kept for row in before for token in row)
    unk = tokenizer.unk_token
    return {"texts": len(texts), "tokens": tokens, "outside_tokens": outside, "outside_rate": outside / max(tokens, 1),
            "texts_changed": sum(a != b for a, b in zip(after, before)),
            "unk_before": sum(row.count(unk) for row in before), "unk_after": sum(row.count(unk) for row in after)}


class VocabularyPruning(Callback):
    """Prunes ``pl_module.model``'s vocabulary to the tokens of the datamodule's train texts (``prune_vocabulary``)
    when any stage is set up, before the model trains, and gives the datamodule the pruned tokenizer (its splits are
    tokenized again with the new ids).

    The kept set depends only on the train texts and these settings, so a resumed fit, or a ``test``/``predict``
    with ``--ckpt_path`` and this callback in its config, prunes the fresh model to the shape of the checkpoint.
    ``HFExport``, ``OnnxExport`` and ``Int8Quantization`` save the pruned tokenizer beside the pruned model; later
    runs read that folder as ``model.model_name`` (without this callback).

    Writes ``<log_dir>/<filename>``: the stats of ``prune_vocabulary`` and, when the data has a test split, its
    ``coverage`` (test tokens outside the kept set, ``[UNK]`` pieces before and after); logs them as
    ``vocab/*`` to the run's logger.

    Args:
        extra_texts_file: a ``.txt`` file, one text per line, whose tokens are kept too (texts the model will serve).
        min_count: keep a train token only if it occurs at least this often (1: every token seen).
        max_positions: also keep only this many position-embedding rows (``trim_positions``), at least
            ``data.max_length``; the saved tokenizer then truncates to it. null: keep them all.
        filename: the stats file inside the run's log directory.
    """

    def __init__(self, extra_texts_file: str | None = None, min_count: int = 1, max_positions: int | None = None,
                 filename: str = "vocab_pruning.json"):
        if extra_texts_file is not None and (Path(extra_texts_file).suffix != ".txt"
                                             or not Path(extra_texts_file).is_file()):
            raise ValueError(f"VocabularyPruning.extra_texts_file: {extra_texts_file} is not an existing .txt file "
                             "(one text per line); fix the path or leave it null")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"VocabularyPruning.min_count must be a positive integer, got {min_count!r}")
        if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                          or max_positions < 1):
            raise ValueError("VocabularyPruning.max_positions must be a positive integer or null, "
                             f"got {max_positions!r}")
        if not filename or Path(filename).name != filename:
            raise ValueError(f"VocabularyPruning.filename must be a plain file name, got {filename!r}")
        self.extra_texts_file = extra_texts_file
        self.min_count = min_count
        self.max_positions = max_positions
        self.filename = filename
        self.stats: dict = {}
        self._pruned: nn.Module | None = None  # the network pruned last (a fit's test after it sets up again)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if pl_module.model is self._pruned:
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "use_tokenizer"):
            raise ValueError("VocabularyPruning needs an EmotionDataModule (its train texts and tokenizer); "
                             "remove the callback or give data: an EmotionDataModule")
        extra = None
        if self.extra_texts_file:
            extra = [t for t in split_lines(Path(self.extra_texts_file).read_text(encoding="utf-8")) if t.strip()]
        original = datamodule.tokenizer
        _, pruned, self.stats = prune_vocabulary(pl_module.model, original, datamodule.texts("train"), extra,
                                                 self.min_count)
        if self.max_positions is not None:
            self._trim_positions(pl_module.model, pruned, datamodule_max_length(datamodule))
        if datamodule.source.has_split("test"):
            self.stats["test"] = coverage(original, pruned, datamodule.texts("test"))
        datamodule.use_tokenizer(pruned)
        self._pruned = pl_module.model
        out = run_dir(trainer) / self.filename  # a collective under DDP: every rank asks
        log.info("vocabulary pruned to %d of %d tokens (%.1fM -> %.1fM parameters)", self.stats["kept_tokens"],
                 self.stats["vocab_size_before"], self.stats["params_before"] / 1e6, self.stats["params_after"] / 1e6)
        if trainer.is_global_zero:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json_text(self.stats))
            if trainer.logger is not None:
                flat = {**self.stats, **{f"test_{k}": v for k, v in self.stats.get("test", {}).items()}}
                trainer.logger.log_metrics({f"vocab/{k}": float(v) for k, v in flat.items()
                                            if isinstance(v, int | float)}, step=0)

    def _trim_positions(self, model: nn.Module, tokenizer, max_length: int) -> None:
        if self.max_positions < max_length:
            raise ValueError(f"VocabularyPruning.max_positions ({self.max_positions}) is below data.max_length "
                             f"({max_length}): the model would read rows it no longer has; raise it to {max_length}")
        removed = trim_positions(model, tokenizer, self.max_positions)
        self.stats |= {"max_positions": self.max_positions, "params_after": self.stats["params_after"] - removed}
