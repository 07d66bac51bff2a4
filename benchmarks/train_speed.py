"""Training throughput (samples/s): the Hugging Face Trainer vs emocompress's Lightning loop.

    python benchmarks/train_speed.py --data ../shared/data/emotion --steps 60 --warmup 10 --rounds 2

Same model (packaged all-MiniLM-L6-v2), batch size 32, max length 128, AdamW, all CPU threads. The HF Trainer
runs with ``group_by_length`` and ``optim="adamw_torch_fused"`` in fp32 and with ``bf16=True``, its fastest
documented CPU setting; emocompress runs its real training path (oversampling, inverse class weights,
length-grouped batches, fused AdamW, the last layer trimmed to the first token) in fp32 and in ``bf16-mixed``;
then in bf16 with the full last layer (``model.trim_last_layer false``: the loops at equal work), and with
``model.freeze_embeddings`` and ``model.freeze_layers`` 1 and 2, which compute less (what that costs in macro F1 is
measured by full fits: see reports/benchmark_freeze/README.md). Each setting trains ``steps`` optimizer steps after ``warmup`` untimed
ones and reports samples/s and padded tokens/s over the timed steps; the settings run in interleaved rounds
(each once per round, in one process) so that drift of a shared machine hits all alike, and the table gives
the median over rounds with the least and greatest. The timed steps are a sample of an epoch's batches, and
the two loops' samplers draw different ones, so samples/s alone compares batches of different lengths. The
script also counts the real and padded tokens per text of each loop's batches over one epoch, and estimates
samples/s over an epoch as tokens/s divided by padded tokens per text: the like-for-like figure.

    python benchmarks/train_speed.py --epoch --rows hf-bf16 bf16 bf16-layers1 --rounds 3

times whole epochs instead (every batch after the warm-up; about 2.5 minutes a setting with native bf16), for
the settings named (keys in ``--help``): slower, but no sampling of batches and no estimate. Needs ``pip
install -e .[bench]`` (the HF Trainer needs accelerate).
"""

import argparse
import logging
import statistics
import tempfile
import time

import torch
from lightning.pytorch import Callback, Trainer

from emocompress.data.datamodule import EmotionDataModule
from emocompress.hardware import cpu_has_native_bf16
from emocompress.models import pretrained
from emocompress.models.classifier import EmotionClassifier


class _Throughput(Callback):
    """Samples and padded tokens per second over the batches after the first ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.samples, self.tokens, self.start = warmup, 0, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.samples += len(batch["labels"])
            self.tokens += batch["input_ids"].numel()

    def on_train_end(self, trainer, pl_module):
        seconds = time.perf_counter() - self.start
        self.rate = (self.samples / seconds, self.tokens / seconds)


def emocompress_rate(data: str, steps: int | None, warmup: int, batch_size: int, precision: str = "32-true",
                     **model_args) -> tuple[float, float]:
    """(samples/s, padded tokens/s) of ``steps`` steps after ``warmup``; ``steps=None``: the rest of an epoch."""
    datamodule = EmotionDataModule(data, batch_size=batch_size)
    model = EmotionClassifier(id2label=datamodule.id2label, **model_args)
    meter = _Throughput(warmup)
    # gradient clipping at 1.0 like the teacher config (and like the HF Trainer default)
    trainer = Trainer(accelerator="cpu", max_epochs=1, max_steps=-1 if steps is None else steps + warmup,
                      limit_val_batches=0, logger=False, gradient_clip_val=1.0,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[meter], precision=precision)
    trainer.fit(model, datamodule=datamodule)
    return meter.rate


def hf_trainer_rate(data: str, steps: int | None, warmup: int, batch_size: int, group_by_length: bool,
                    bf16: bool = False) -> tuple[float, float]:
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers import Trainer as HFTrainer

    datamodule = EmotionDataModule(data, batch_size=batch_size, oversample_to=None)
    datamodule.setup("fit")
    train = datamodule.splits["train"]
    model = AutoModelForSequenceClassification.from_pretrained(pretrained.resolve(pretrained.PACKAGED_MINILM),
                                                               num_labels=datamodule.num_classes)
    timer = {"tokens": 0}

    def count_tokens(module, args, kwargs):
        # the batches the timed steps compute on (the Trainer collates more batches than it trains on)
        if "start" in timer and "seconds" not in timer:
            timer["tokens"] += kwargs["input_ids"].numel()

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                timer["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            timer["seconds"] = time.perf_counter() - timer["start"]
            timer["steps"] = state.global_step - warmup

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=batch_size, num_train_epochs=1,
                                 max_steps=-1 if steps is None else steps + warmup,
                                 learning_rate=1e-4, length_column_name="length",
                                 train_sampling_strategy="group_by_length" if group_by_length else "random",
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                 disable_tqdm=True, dataloader_drop_last=True, bf16=bf16,
                                 optim="adamw_torch_fused")  # its fastest documented optimizer on CPU, as ours
        HFTrainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(
            datamodule.tokenizer), callbacks=[Timer()]).train()
    # drop_last: every step is a full batch
    return timer["steps"] * batch_size / timer["seconds"], timer["tokens"] / timer["seconds"]


def tokens_per_text(data: str, batch_size: int) -> dict[str, tuple[float, float]]:
    """(real, padded) tokens per training text over one epoch of each loop's batches: what each setting
    computes on, so that a throughput gap can be told apart from a padding gap."""
    import numpy as np
    from transformers.trainer_pt_utils import LengthGroupedSampler

    ours = EmotionDataModule(data, batch_size=batch_size)
    ours.setup("fit")
    real = padded = texts = 0
    for batch in ours.train_dataloader():
        real, padded = real + int(batch["attention_mask"].sum()), padded + batch["input_ids"].numel()
        texts += len(batch["input_ids"])
    counts = {"emocompress (oversampled)": (real / texts, padded / texts)}
    plain = EmotionDataModule(data, batch_size=batch_size, oversample_to=None)
    plain.setup("fit")
    lengths = np.array(plain.splits["train"]["length"])
    order = list(LengthGroupedSampler(batch_size, lengths=lengths.tolist(), generator=torch.Generator().manual_seed(0)))
    batches = [lengths[order[i:i + batch_size]] for i in range(0, len(order) - batch_size + 1, batch_size)]
    texts = sum(len(b) for b in batches)
    counts["HF Trainer, group_by_length"] = (sum(b.sum() for b in batches) / texts,
                                             sum(len(b) * b.max() for b in batches) / texts)
    return counts

def _settings(common: tuple) -> dict[str, tuple[str, object]]:
    """The settings by their ``--rows`` key: (row name, a function measuring it with the ``common`` arguments)."""
    bf16 = "bf16-mixed"
    return {
        "hf-fp32": ("HF Trainer, group_by_length, fp32, adamw_torch_fused", lambda: hf_trainer_rate(*common, True)),
        # the peer's fastest documented CPU setting: bf16 autocast and the fused AdamW kernel
        "hf-bf16": ("HF Trainer, group_by_length, bf16, adamw_torch_fused",
                    lambda: hf_trainer_rate(*common, True, bf16=True)),
        "fp32": ("emocompress, fp32", lambda: emocompress_rate(*common)),
        # CPUs with AVX512-BF16/AMX run bf16 matmuls natively; fp32 master weights, as on GPUs
        "bf16": ("emocompress, bf16-mixed", lambda: emocompress_rate(*common, bf16)),
        # the same without trimming the last layer to the first token (model.trim_last_layer, on by default)
        "bf16-full": ("emocompress, bf16-mixed, full last layer",
                      lambda: emocompress_rate(*common, bf16, trim_last_layer=False)),
        # computing less: no gradient for the embeddings (half the parameters), or for them and the first 1 or 2
        # layers
        "bf16-emb": ("emocompress, bf16-mixed, frozen embeddings",
                     lambda: emocompress_rate(*common, bf16, freeze_embeddings=True)),
        "bf16-layers1": ("emocompress, bf16-mixed, frozen embeddings + 1 layer",
                         lambda: emocompress_rate(*common, bf16, freeze_layers=1)),
        "bf16-layers2": ("emocompress, bf16-mixed, frozen embeddings + 2 layers",
                         lambda: emocompress_rate(*common, bf16, freeze_layers=2)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/emotion")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epoch", action="store_true",
                        help="time the rest of a whole epoch after the warm-up steps instead of --steps")
    keys = list(_settings(()))  # the keys only: nothing is measured here
    parser.add_argument("--rows", nargs="+", choices=keys, metavar="KEY",
                        help=f"only these settings (default: all): {' '.join(keys)}")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    common = (args.data, None if args.epoch else args.steps, args.warmup, args.batch_size)
    settings = {name: measure for key, (name, measure) in _settings(common).items()
                if not args.rows or key in args.rows}
    if not cpu_has_native_bf16():
        # emulated bf16 trains many times slower than fp32 (benchmarks/precision_step.py, measured in
        # reports/training_speed/README.md): those rows would measure the emulation, for an hour
        settings = {name: fn for name, fn in settings.items() if "bf16" not in name}
        print("this CPU has no native bf16 (AVX512-BF16 or AMX): the bf16 rows are skipped")
        if not settings:
            parser.error("nothing left to measure: name fp32 rows with --rows (hf-fp32 fp32)")
    rates = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, measure in settings.items():
            rates[name].append(measure())
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{'the rest of an epoch' if args.epoch else f'{args.steps} timed steps'} after {args.warmup} warm-up "
          f"steps, {args.rounds} interleaved rounds")
    # 60 steps see 60 of an epoch's 500-650 batches, and which ones differs between the loops' samplers: the
    # timed batches of one loop can be 10% longer than the other's. Padded tokens/s is the rate at equal work;
    # divided by the tokens per text of a whole epoch it estimates samples/s over an epoch. With --epoch the
    # timed samples/s is that rate itself (bar the warm-up steps).
    per_text = tokens_per_text(args.data, args.batch_size)
    for name, (real, padded) in per_text.items():
        print(f"tokens per training text over an epoch, {name}: {real:.2f} real, {padded:.2f} with padding")
    print(f"{'':<56}{'samples/s median [min, max]':>30}{'padded tokens/s median [min, max]':>36}"
          f"{'epoch samples/s (est.)':>24}")
    sample_rates, epoch_rates = {}, {}
    for name, values in rates.items():
        sample_rates[name], tokens = zip(*values)
        padded = per_text["HF Trainer, group_by_length" if name.startswith("HF") else "emocompress (oversampled)"][1]
        epoch_rates[name] = [t / padded for t in tokens]
        print(f"{name:<56}{_spread(sample_rates[name]):>30}{_spread(tokens):>36}"
              f"{statistics.median(epoch_rates[name]):>24.1f}")
    for ours in (name for name in rates if name.startswith("emocompress")):
        peer = f"HF Trainer, group_by_length, {'bf16' if 'bf16' in ours else 'fp32'}, adamw_torch_fused"
        if peer not in rates:
            continue
        for what, table in (("timed samples/s", sample_rates), ("epoch samples/s (est.)", epoch_rates)):
            ratios = [a / b for a, b in zip(table[ours], table[peer])]
            print(f"{ours} / {peer}, {what}, per round: {', '.join(f'{r:.2f}x' for r in ratios)}")


def _spread(values) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]"


if __name__ == "__main__":
    main()
