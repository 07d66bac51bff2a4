"""``emocompress`` and ``python -m emocompress``: the subcommands. The top-level help is answered here,
before torch, transformers and lightning are imported (well under a second rather than several)."""

import sys

USAGE = """\
usage: emocompress {fit,validate,test,predict,benchmark,vocab,serve,compress} [-c CONFIG ...] [options]

Fine-tune transformer emotion classifiers on imbalanced text and compress them (distillation,
pruning, INT8), with PyTorch Lightning; then measure what each compression bought.

subcommands (each takes -c/--config, repeatable: a later file wins key by key, and --help):
  fit         train, then test the best checkpoint (--test_after_fit false skips the test)
  validate    one evaluation epoch over the val split (--ckpt_path <best .ckpt>)
  test        one evaluation epoch over the test split; INT8 first with -c configs/overlays/quantize.yaml
  predict     predictions for --data.predict_file (default: the test split) into predictions.jsonl
  benchmark   compare exported models: size, latency, metrics with 95% intervals, paired tests
  vocab       train a student vocabulary (WordPiece) on a data set's train texts, for model.model_name
  serve       serve an ONNX artifact folder over HTTP, torch-free (FOLDER --host H --port P; --help)
  compress    search distillation x pruning x INT8 for the fastest model within an accuracy budget (Optuna)

examples:
  emocompress fit -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml
  emocompress fit -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml --print_config
  emocompress test -c configs/trainer/default.yaml -c configs/recipes/teacher.yaml --ckpt_path logs/teacher/version_0/checkpoints/<best>.ckpt
  emocompress benchmark -c configs/benchmark/defaults.yaml -c configs/benchmark/compression.yaml
  emocompress compress -c configs/compress.yaml --teacher logs/teacher/version_0/hf_model --data ../shared/data/emotion
  emocompress fit --help                  every option of fit (trainer, data, model)
  emocompress serve logs/teacher_onnx/version_0/onnx --port 8000    then open http://127.0.0.1:8000
"""


SUBCOMMANDS = ("fit", "validate", "test", "predict", "benchmark", "vocab", "serve", "compress")


def main(argv: list[str] | None = None) -> None:
    """Run ``emocompress <subcommand> ...``; ``argv`` defaults to ``sys.argv[1:]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        sys.exit(0 if args else 2)
    if args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        # LightningCLI would answer "choose from 'fit', 'validate', 'test', 'predict'": not benchmark, serve, ...
        sys.stderr.write(f"emocompress: error: unknown subcommand {args[0]!r}; give one of {', '.join(SUBCOMMANDS)} "
                         "(emocompress --help)\n")
        sys.exit(2)
    if args[0] == "serve":  # the HTTP server is torch-free: it must not pay for (or need) the imports below
        from emocompress.deploy.http import main as serve

        return serve(args[1:])
    from emocompress.cli import main as run  # torch, transformers, lightning: seconds to import

    run(argv)


if __name__ == "__main__":
    main()
