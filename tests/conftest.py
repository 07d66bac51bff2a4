"""Shared fixtures: a tiny random BERT and tokenizer saved to disk, small hand-made data sets, factories
for the data module and the CPU Trainer that the fitting tests share, and a throwaway PostgreSQL server.

The tiny model goes through the real ``from_pretrained`` path offline in well under a second.
"""

import glob
import itertools
import os
import pwd
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs `pytest -n auto`) each worker takes its share of the cores: torch's default,
# every core in every process, would oversubscribe them, and idle OpenMP threads spin.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))

# Words that mark each class, plus filler shared by all, so a tiny model can learn a little.
CLASS_WORDS = {
    "anger": ["furious", "angry", "mad", "irritated"],
    "joy": ["happy", "glad", "cheerful", "delighted"],
    "love": ["loving", "tender", "caring", "fond"],
}
FILLER = ["i", "feel", "so", "today", "really", "am", "very", "quite", "the", "day", "was"]


def make_texts(label: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{label}-{seed}")
    return [" ".join(rng.sample(FILLER, rng.randint(2, 8)) + [rng.choice(CLASS_WORDS[label])]) for _ in range(n)]


def write_split(path: Path, counts: dict[str, int], seed: int) -> Path:
    lines = [f"{text};{label}" for label, n in counts.items() for text in make_texts(label, n, seed)]
    random.Random(seed).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 16-wide random BERT with a word-level vocabulary, saved with its tokenizer."""
    out = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + [w for ws in CLASS_WORDS.values() for w in ws]
    # transformers 5 takes the vocabulary as `vocab`; a `vocab_file=` argument is silently ignored
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    config = AutoConfig.for_model("bert", vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=512,
                                  # no dropout, so runs that see the same batches are comparable bit for bit
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # seeded: a session fixture is first built by whichever test needs it first, so unseeded weights would
    # depend on which tests ran before (a full-suite run once drew a BERT too weak for test_deploy's margins)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def emotion_dir(tmp_path) -> Path:
    """train/val/test ``text;label`` files, imbalanced 8:4:3 in train; val and test have odd sizes."""
    folder = tmp_path / "emotion"
    folder.mkdir()
    write_split(folder / "train.txt", {"anger": 8, "joy": 4, "love": 3}, seed=0)
    write_split(folder / "val.txt", {"anger": 3, "joy": 2, "love": 2}, seed=1)
    write_split(folder / "test.txt", {"anger": 4, "joy": 3, "love": 2}, seed=2)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny BERT with a seeded head for ``emotion_dir``'s labels: a stand-in for a fine-tuned teacher."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-teacher")
    torch.manual_seed(0)
    id2label = {0: "anger", 1: "joy", 2: "love"}
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def _constant(source: str, out: Path, label: int, drop_layers: int = 0, extra_tokens: int = 0) -> str:
    """``source`` saved to ``out`` with a head that always predicts class ``label`` (zero weights, one large bias),
    ``drop_layers`` fewer layers (smaller), or ``extra_tokens`` unused embedding rows (bigger, same predictions)."""
    model = AutoModelForSequenceClassification.from_pretrained(source)
    if drop_layers:
        model.bert.encoder.layer = model.bert.encoder.layer[:-drop_layers]
        model.config.num_hidden_layers -= drop_layers
    if extra_tokens:
        model.resize_token_embeddings(model.config.vocab_size + extra_tokens)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), 3) * 5.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def search_models(tiny_teacher_dir, tmp_path_factory) -> dict[str, str]:
    """Models the search tests copy as trial results: a teacher that always says anger (val macro F1 0.2 on
    ``emotion_dir``); ``same``: a copy of it; ``big``: the same predictions, a bigger file; ``bad``: smaller, always
    love (macro F1 0.148, over any budget below 5 points)."""
    out = tmp_path_factory.mktemp("search-models")
    return {"teacher": _constant(tiny_teacher_dir, out / "teacher", 0),
            "same": _constant(tiny_teacher_dir, out / "same", 0),
            "big": _constant(tiny_teacher_dir, out / "big", 0, extra_tokens=500),
            "bad": _constant(tiny_teacher_dir, out / "bad", 2, drop_layers=1)}


@pytest.fixture
def make_datamodule(emotion_dir, tiny_model_dir):
    """``make_datamodule(model_dir=None, data_dir=None, **overrides)``: an ``EmotionDataModule`` on ``emotion_dir``
    tokenized for the tiny BERT, unless told otherwise; ``overrides`` (``batch_size=4``, ...) go to the constructor."""
    from emocompress.data.datamodule import EmotionDataModule

    def make(model_dir=None, data_dir=None, **overrides):
        return EmotionDataModule(str(data_dir or emotion_dir), tokenizer=str(model_dir or tiny_model_dir),
                                 **overrides)

    return make


@pytest.fixture
def tiny_trainer(tmp_path):
    """``tiny_trainer(**overrides)``: a quiet 1-process CPU Trainer writing under ``tmp_path``, with no logger and
    no sanity validation; ``overrides`` (``max_steps``, ``callbacks``, ...) replace or add Trainer arguments."""
    from lightning.pytorch import Trainer

    def make(**overrides):
        return Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                          "enable_model_summary": False, "default_root_dir": tmp_path, "num_sanity_val_steps": 0,
                          **overrides})

    return make


class _Exploit:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for code a planted pickle would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def malicious_checkpoint(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint-looking file whose unpickling would run code, the file that code would create)."""
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model_name": "x", "id2label": {0: "a", 1: "b"}},
                "payload": _Exploit(marker)}, path)
    return path, marker


def _postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on the PATH, or Debian's /usr/lib/postgresql/<version>/bin (the
    newest), which is not on it."""
    if found := shutil.which("pg_ctl"):
        return Path(found).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda f: int(Path(f).parent.name.split(".")[0]))
    return next((Path(f) for f in reversed(folders) if (Path(f) / "initdb").is_file()), None)


@pytest.fixture(scope="session")
def postgres_server():
    """``new_database(name)``: a fresh database on a throwaway PostgreSQL server, as a SQLAlchemy URL. The server
    listens only on a unix socket in its own temp folder (no port to collide with another pytest-xdist worker)
    and trusts local connections; it is stopped and deleted after the session. Skips, with the reason, where the
    server binaries or the ``psycopg`` driver are missing or the server does not start: never a failure."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed (pip install 'psycopg[binary]')")
    import sqlalchemy

    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); install postgresql to run these tests")
    # initdb and postgres refuse to run as root: as root, run them as the postgres system user
    as_user, owner = [], None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run the PostgreSQL server as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root, and there is no runuser to run the PostgreSQL server as postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    # short: the socket's path (<folder>/.s.PGSQL.5432) must fit in 107 bytes, so not under tmp_path_factory
    folder = Path(tempfile.mkdtemp(prefix="emocompress-pg-"))
    if owner:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data = folder / "data"

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=60)

    started = pg(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                 "--no-sync")
    if started.returncode == 0:  # -F: no fsync, a throwaway server
        started = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "30",
                     "-o", f"-k {folder} -c listen_addresses= -F", "start")
    stop = (str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    if started.returncode != 0:
        log = (folder / "server.log").read_text() if (folder / "server.log").is_file() else ""
        pg(*stop)  # a server that started after pg_ctl stopped waiting
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start: {(started.stderr + log).strip()[-500:]}")
    admin = sqlalchemy.create_engine(f"postgresql+psycopg://postgres@/postgres?host={folder}",
                                     isolation_level="AUTOCOMMIT")

    numbers = itertools.count()

    def new_database(name: str) -> str:
        name = f"{name[:55]}_{next(numbers)}"  # unique, within PostgreSQL's 63 bytes
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        return f"postgresql+psycopg://postgres@/{name}?host={folder}"

    yield new_database
    admin.dispose()
    pg(*stop)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A SQLAlchemy URL of an empty database of its own on the throwaway server (``postgres_server``)."""
    return postgres_server(request.node.name.lower().translate(str.maketrans("[]-.", "____")))
