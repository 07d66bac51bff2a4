"""A student vocabulary of its own: a WordPiece tokenizer trained on the training texts.

    emocompress vocab --data ../shared/data/emotion --vocab_size 4000 --out_dir logs/vocab/emotion_4k

A small-encoder student over the teacher's 30,522-token table spends most of its parameters on rows it never
reads (91% of the BiLSTM's 2.15M). A vocabulary learned from the training texts keeps the frequent words
whole and spells the rest in word pieces, so a few thousand rows cover the data. The folder it writes is
an ordinary tokenizer folder: give it as ``model.model_name`` and the student reads its ids, while a
distillation teacher keeps tokenizing the raw texts with its own tokenizer.
"""

import json
import logging
from pathlib import Path

from emocompress.data.sources import DataSource
from emocompress.io import atomic_dir, check_replaceable

log = logging.getLogger(__name__)

# What the folder was trained from; also marks it as a vocabulary folder (replaced only with overwrite).
_INFO_FILE = "vocabulary.json"

# BERT's special tokens: the student's [MASK] is also what the augmented transfer set writes for a masked word.
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def build_tokenizer(texts: list[str], vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True,
                    max_length: int = 512):
    """A WordPiece tokenizer trained on ``texts``, normalised and split into words as BERT does, wrapped as a
    ``transformers`` fast tokenizer (``[CLS] text [SEP]``, padding id 0).

    Args:
        texts: the training texts.
        vocab_size: most entries of the vocabulary, special tokens and single characters included.
        min_frequency: a merge is learned only from pieces seen at least this often.
        lowercase: lowercase and strip accents before splitting (as uncased BERT models).
        max_length: the tokenizer's ``model_max_length`` (a small-encoder student has no position limit).

    >>> tok = build_tokenizer(["i feel happy", "i feel sad", "happy happy day"], vocab_size=60, min_frequency=1)
    >>> tok("I feel HAPPY")["input_ids"] == [tok.cls_token_id, *tok.convert_tokens_to_ids(["i", "feel", "happy"]),
    ...                                      tok.sep_token_id]
    True
    >>> tok.pad_token_id
    0
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())  # [PAD] first: id 0, the embedding's padding row
    tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False))
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, **SPECIAL_TOKENS)


def train_vocabulary(data: str, out_dir: str, vocab_size: int = 8000, min_frequency: int = 2,
                     lowercase: bool = True, text_column: str = "text", label_column: str = "label",
                     overwrite: bool = False) -> Path:
    """Train a WordPiece vocabulary on the train split of ``data`` and save it as a tokenizer folder.

    Only the train split is read: a vocabulary learned from val or test texts would leak them into training.
    Training is not reproducible: ``tokenizers`` breaks ties between equally frequent merges differently in
    each process (two trainings of 4,000 entries on the emotion set differed in 8 entries and in most ids), so
    an existing vocabulary is never replaced unless ``overwrite`` says so: a model trained on it reads its ids.

    Args:
        data: the data set, as ``data.data`` of a run (a folder of train/val/test files, or a hub name).
        out_dir: the tokenizer folder to write.
        vocab_size: most entries of the vocabulary (2,000 to 16,000 suit a small-encoder student).
        min_frequency: a merge is learned only from pieces seen at least this often.
        lowercase: lowercase and strip accents first.
        text_column: text column of CSV/JSON/hub data.
        label_column: label column of CSV/JSON/hub data.
        overwrite: replace an earlier vocabulary in ``out_dir`` (only if no model was trained on it).

    Returns:
        ``out_dir``: give it as ``model.model_name`` of a ``bilstm``/``meanpool``/``cnn`` student.

    Raises:
        ValueError: ``vocab_size`` is too small for the special tokens and the characters, ``out_dir`` already
            holds a vocabulary (and ``overwrite`` is false) or something else, or the data cannot be read.
    """
    if vocab_size < 100:
        raise ValueError(f"vocab_size must be at least 100 (special tokens and single characters come first), "
                         f"got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive integer, got {min_frequency}")
    out = Path(out_dir)
    if (out / _INFO_FILE).is_file() and not overwrite:
        raise ValueError(f"{out}: already holds a vocabulary, which models trained on it read their ids from; a new "
                         "training would not give the same ids, so it is not replaced: choose another out_dir, or "
                         "pass --overwrite true if no model was trained on it")
    check_replaceable(out, _INFO_FILE, "a vocabulary folder")
    source = DataSource(data, text_column, label_column)
    texts = list(source.read("train")["text"])
    tokenizer = build_tokenizer(texts, vocab_size, min_frequency, lowercase)
    info = {"data": data, "train_texts": len(texts), "vocab_size": len(tokenizer), "min_frequency": min_frequency,
            "lowercase": lowercase, "unk_rate": _unk_rate(tokenizer, texts)}
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / _INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("vocabulary of %d entries from %d train texts of %s (%.2f%% of their tokens unknown): %s",
             len(tokenizer), len(texts), data, 100 * info["unk_rate"], out)
    return out


def _unk_rate(tokenizer, texts: list[str]) -> float:
    """Share of the tokens of ``texts`` that are ``[UNK]`` (a word with a character never seen in training)."""
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    return sum(i == tokenizer.unk_token_id for i in ids) / max(len(ids), 1)
