"""What a search writes: one progress line per finished trial; then, for the choice made on val (``choice``), in
the search folder ``trials.csv``/``.md``, ``pareto.png``, the test verdict of ``emocompress benchmark``
(``test_benchmark/``), and ``summary.md``/``.json`` (the chosen model, its artifact and the command that reproduces
it)."""

import csv
import datetime
import inspect
import json
import logging
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from emocompress.benchmark.html import write_html_report
from emocompress.benchmark.report import invoking_command, markdown_table
from emocompress.benchmark.run import benchmark
from emocompress.evaluation.plots import close_figure
from emocompress.io import json_text
from emocompress.search.choice import Choice, within_budget
from emocompress.search.trials import COMMAND_FILE, Shared

log = logging.getLogger(__name__)
# budget.objective -> the measured value it minimizes, and its unit
# matplotlib is not thread-safe: searches in threads of one process (tests) draw one at a time
_PLOT_LOCK = threading.Lock()
OBJECTIVE_KEYS = {"latency": "latency_ms", "size": "size_mb"}
_UNITS = {"latency_ms": "ms", "size_mb": "MB"}
# the val latency timed again, together with the teacher and the other trials within budget (``retime``);
# ``latency_ms`` stays the first timing, taken alone when the trial ended
RETIMED = "latency_ms_retimed"
COLUMNS = ["trial", "state", "settings", "val_macro_f1", "macro_f1_drop", "worst_class_f1_drop", "rare_recall",
           "latency_ms", RETIMED, "size_mb", "within_budget", "pareto", "run", "same_as"]


def _settings_text(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def _verdict_word(trial: optuna.trial.FrozenTrial) -> str:
    word = _state_word(trial)
    if "reused" in trial.user_attrs:  # tested with its post-training options, not fitted
        word += f" (reused fit of trial {trial.user_attrs['reused']})"
    return word


def _state_word(trial: optuna.trial.FrozenTrial) -> str:
    if "same_as" in trial.user_attrs:
        return f"repeat of trial {trial.user_attrs['same_as']}"
    if trial.state == TrialState.PRUNED:
        return "pruned (hopeless at epoch {epoch})".format(**trial.user_attrs.get("stopped", {"epoch": "?"}))
    if trial.state != TrialState.COMPLETE:
        return trial.state.name.lower()
    return "kept" if within_budget(trial) else "over budget"


def progress_line(trial: optuna.trial.FrozenTrial, budget, reference: dict, done: list, total: int, start: float,
                  timeout: float | None) -> str:
    """``trial 3 [student=layers3 int8=onnxruntime]: val macro F1 0.8712 (-1.10 pt), 4.20 ms: kept; 4/20 done,
    ETA 0:41:00``: the trials the budget leaves (``n_trials``, else every setting) times the time per trial
    finished since this process started (by any worker on the storage), capped by what ``timeout_min`` leaves."""
    val = trial.user_attrs.get("val")
    key = OBJECTIVE_KEYS[budget.objective]
    measured = (f"val macro F1 {val['macro_f1']:.4f} ({100 * (val['macro_f1'] - reference['macro_f1']):+.2f} pt), "
                f"{val[key]:.3g} {_UNITS[key]}" if val else "not measured")
    elapsed = time.monotonic() - start
    limit = budget.n_trials or total
    left = max(min(limit, total) - len(done), 0)
    per_trial = elapsed / max(len([t for t in done if t.datetime_start and t.datetime_start.timestamp() >=
                                   time.time() - elapsed]), 1)
    eta = left * per_trial if left else 0.0
    if timeout is not None:
        eta = min(eta, max(timeout - elapsed, 0.0))
    return (f"trial {trial.number} [{_settings_text(trial.user_attrs.get('settings', {}))}]: {measured}: "
            f"{_verdict_word(trial)}; {len(done)}/{min(limit, total)} done, "
            f"ETA {datetime.timedelta(seconds=round(eta))}")


def trial_rows(trials: list[optuna.trial.FrozenTrial], reference: dict, choice: Choice) -> list[dict]:
    rows, numbers = [], {t.number for t in choice.front}
    for t in trials:
        val = t.user_attrs.get("val") or {}
        drops = [reference["class_f1"][c] - f for c, f in (val.get("class_f1") or {}).items()
                 if f is not None and reference["class_f1"].get(c) is not None]
        rows.append({"trial": t.number, "state": _verdict_word(t), "settings": _settings_text(t.user_attrs.get(
            "settings", {})), "val_macro_f1": val.get("macro_f1"),
            "macro_f1_drop": reference["macro_f1"] - val["macro_f1"] if val else None,
            "worst_class_f1_drop": max(drops) if drops else None,
            "rare_recall": _rare_recall(val, reference),
            "latency_ms": val.get("latency_ms"), RETIMED: choice.cost(t),
            "size_mb": val.get("size_mb"), "within_budget": within_budget(t),
            "pareto": t.number in numbers, "run": t.user_attrs.get("run"), "same_as": t.user_attrs.get("same_as")})
    return rows


def _rare_recall(val: dict, reference: dict) -> float | None:
    if not val:
        return None
    rare = min((c for c, n in reference["support"].items() if n), key=lambda c: reference["support"][c])
    return val["class_recall"].get(rare)


def pareto_plot(rows: list[dict], reference: dict, budget, chosen: int | None, path: Path) -> None:
    """Val macro F1 against the objective: the front, the other (dominated or over-budget) trials, the teacher,
    the budget's macro-F1 line, the chosen trial. Latency is the re-timed one where there is one (the teacher's
    in ``reference[RETIMED]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = OBJECTIVE_KEYS[budget.objective]

    def cost(row: dict) -> float:
        return row[RETIMED] if key == "latency_ms" and row.get(RETIMED) is not None else row[key]

    measured = [r for r in rows if r[key] is not None and r["same_as"] is None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = [("over budget", [r for r in measured if not r["within_budget"]], "x", "tab:gray"),
              ("within budget, dominated", [r for r in measured if r["within_budget"] and not r["pareto"]], "o",
               "tab:blue"),
              ("Pareto front", [r for r in measured if r["pareto"]], "o", "tab:red")]
    for label, group, marker, color in groups:
        if group:
            ax.scatter([cost(r) for r in group], [r["val_macro_f1"] for r in group], marker=marker, color=color,
                       label=label, zorder=3)
    front = sorted((r for r in measured if r["pareto"]), key=cost)
    if front:
        ax.step([cost(r) for r in front], [r["val_macro_f1"] for r in front], where="post", color="tab:red", lw=1)
    for r in measured:
        ax.annotate(str(r["trial"]), (cost(r), r["val_macro_f1"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.scatter([cost(reference)], [reference["macro_f1"]], marker="s", color="black", label="teacher", zorder=3)
    ax.axhline(reference["macro_f1"] - budget.max_macro_f1_drop, color="tab:green", ls="--", lw=1,
               label=f"budget (-{100 * budget.max_macro_f1_drop:.3g} pt)")
    chosen_row = next((r for r in measured if r["trial"] == chosen), None)
    if chosen_row:
        ax.scatter([cost(chosen_row)], [chosen_row["val_macro_f1"]], marker="*", s=220, color="gold",
                   edgecolor="black", label="chosen", zorder=4)
    ax.set_xscale("log")
    retimed = " (within budget: re-timed together)" if reference.get(RETIMED) is not None else ""
    ax.set_xlabel(f"latency ms, batch {budget.batch_size}{retimed}" if key == "latency_ms" else key)
    ax.set_ylabel("val macro F1")
    ax.set_title("compress: trials on val")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    close_figure(fig)


def _write_tables(out: Path, rows: list[dict], shown: list[str]) -> None:
    with (out / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "trials.md").write_text(markdown_table(rows, shown))


# benchmark() arguments the test verdict sets itself; ``verdict`` may set the others
_VERDICT_OWN = {"models", "data", "split", "baseline", "out_dir", "trust_remote_code"}


def check_verdict(verdict: dict) -> None:
    """Refuse a ``verdict`` key that ``benchmark`` does not take (or that the verdict sets itself) before the search:
    the verdict is run when every trial is done, hours later.

    Raises:
        ValueError: naming ``verdict.<key>`` and the keys it may have.
    """
    allowed = [name for name in inspect.signature(benchmark).parameters if name not in _VERDICT_OWN]
    for key in verdict:
        if key not in allowed:
            raise ValueError(f"verdict.{key}: not a setting of the test benchmark; give some of {', '.join(allowed)}")


def test_verdict(out: Path, shared: Shared, front: list, chosen, budget, settings: dict,
                 trust_remote_code: bool) -> list[dict]:
    """The chosen model and the Pareto front measured once on test by ``benchmark`` against the teacher, each with
    whether test agrees with the val decision (within budget): ``agrees`` (the macro-F1 difference's 95% interval
    and every point estimate within the budget), ``inconclusive`` (the points within, the interval reaching past
    the macro-F1 limit) or ``disagrees`` (a point estimate past a limit)."""
    names = {t.number: f"trial {t.number}" + (" (chosen)" if t.number == chosen.number else "") for t in front}
    models = {"teacher": shared.teacher, **{names[t.number]: t.user_attrs["artifact"] for t in front}}
    rows = benchmark(models, data=shared.data, split="test", baseline="teacher", out_dir=str(out / "test_benchmark"),
                     **settings, trust_remote_code=trust_remote_code)
    reports = json.loads((out / "test_benchmark" / "reports.json").read_text())
    teacher = reports["teacher"]["per_class"]
    verdicts = []
    for row in rows[1:]:
        classes = reports[row["model"]]["per_class"]
        worst = max(teacher[c]["f1"] - classes[c]["f1"] for c in classes if classes[c]["f1"] is not None)
        points = [-row["macro_f1_diff"] <= budget.max_macro_f1_drop]
        if budget.max_class_f1_drop is not None:
            points.append(worst <= budget.max_class_f1_drop)
        if budget.min_rare_recall is not None:
            rare = min((c for c in classes if classes[c]["support"]), key=lambda c: classes[c]["support"])
            points.append(classes[rare]["accuracy"] >= budget.min_rare_recall)
        word = ("disagrees" if not all(points) else
                "agrees" if -row["macro_f1_diff_low"] <= budget.max_macro_f1_drop else "inconclusive")
        verdicts.append({"model": row["model"], "test_macro_f1": row["macro_f1"],
                         "macro_f1_diff": row["macro_f1_diff"], "diff_low": row["macro_f1_diff_low"],
                         "diff_high": row["macro_f1_diff_high"], "mcnemar_p": row.get("mcnemar_p"),
                         "worst_class_f1_drop": worst, "latency_ms": row["latency_ms_median"],
                         "speedup": row["speedup"], "verdict": word})
    return verdicts


def finish(study: optuna.Study, choice: Choice, budget, shared: Shared, reference: dict, run_test: bool,
           verdict_settings: dict, trust_remote_code: bool) -> dict:
    """Write the report of ``choice`` (made on val by ``choice.choose``), with the test verdict if ``run_test``;
    the summary (also ``summary.json``)."""
    out = shared.out_dir
    trials = study.get_trials(deepcopy=False)
    front, chosen, retimed = choice.front, choice.chosen, choice.retimed
    key = OBJECTIVE_KEYS[budget.objective]
    rows = trial_rows(trials, reference, choice)
    shown = [c for c in COLUMNS[:-2] if c != RETIMED or retimed]
    _write_tables(out, rows, shown)
    if retimed:
        reference = {**reference, RETIMED: retimed["teacher"]}
    with _PLOT_LOCK:
        pareto_plot(rows, reference, budget, chosen.number if chosen else None, out / "pareto.png")
    summary = {"teacher": shared.teacher, "data": shared.data, "objective": key, "budget": budget.__dict__,
               "teacher_val": {k: reference[k] for k in ("macro_f1", "latency_ms", RETIMED, "size_mb")
                               if k in reference},
               "retimed": {"rounds": budget.retime_rounds, "latency_ms": retimed} if retimed else None,
               "trials": {state.name.lower(): sum(t.state == state and "same_as" not in t.user_attrs for t in trials)
                          for state in TrialState},
               "repeats": sum("same_as" in t.user_attrs for t in trials),
               "reused_fits": sum("reused" in t.user_attrs for t in trials),
               "pareto": [t.number for t in front], "chosen": None, "test": []}
    if chosen is None:
        log.warning("compress: no trial is within the budget on val; see %s", out / "trials.md")
    else:
        val = chosen.user_attrs["val"]
        summary["chosen"] = {"trial": chosen.number, "settings": chosen.user_attrs["settings"],
                             "artifact": chosen.user_attrs["artifact"], "val_macro_f1": val["macro_f1"], key: val[key],
                             "val_speedup": reference["latency_ms"] / val["latency_ms"],
                             **({RETIMED: choice.cost(chosen), "val_speedup_first": reference["latency_ms"] /
                                 val["latency_ms"], "val_speedup": reference[RETIMED] / choice.cost(chosen)}
                                if retimed else {}),
                             "command": chosen.user_attrs.get("command") or  # studies made before it was stored
                             (Path(chosen.user_attrs["run"]) / COMMAND_FILE).read_text().strip()}
        if run_test:
            summary["test"] = test_verdict(out, shared, front, chosen, budget, verdict_settings, trust_remote_code)
    (out / "summary.json").write_text(json_text(summary))
    (out / "summary.md").write_text(_summary_markdown(summary, rows, budget, shown))
    # the benchmark's page, with the trials as its table and the front as its figure
    write_html_report(out, "compress: the search's trials (val)", rows, columns=shown,
                      figures=[("val macro F1 against cost: the Pareto front and the dominated trials",
                                out / "pareto.png")] if (out / "pareto.png").is_file() else [],
                      environment={"teacher": shared.teacher, "data": shared.data, "objective": key,
                                   "budget": budget.__dict__, "chosen": summary["chosen"]},
                      command=invoking_command(), notes=(f"Chosen on val: trial {summary['chosen']['trial']}, "
                                                          f"{summary['chosen']['artifact']}; it is reproduced by: "
                                                          f"{summary['chosen']['command']}" if summary["chosen"]
                                                          else "No trial is within the budget on val."),
                      tables=[("Test verdict (emocompress benchmark, once, after the choice)", summary["test"])]
                      if summary["test"] else [])
    log.info("compress: report written to %s\n%s", out, (out / "summary.md").read_text())
    return summary


def _summary_markdown(summary: dict, rows: list[dict], budget, shown: list[str]) -> str:
    teacher, chosen = summary["teacher_val"], summary["chosen"]
    lines = ["# compress: the search's result", "",
             f"Teacher {summary['teacher']} on val: macro F1 {teacher['macro_f1']:.4f}, "
             f"{teacher['latency_ms']:.3g} ms at batch {budget.batch_size}"
             + (f" timed alone, {teacher[RETIMED]:.3g} ms re-timed" if RETIMED in teacher else "") +
             f", {teacher['size_mb']:.3g} MB. Budget: {summary['budget']}.", ""]
    if summary["retimed"]:
        lines += [f"Latency for the choice: the teacher and the trials within budget re-timed together on val in "
                  f"{summary['retimed']['rounds']} interleaved rounds (`{RETIMED}`); `latency_ms` is each "
                  "trial's first timing, taken alone when it ended, beside whatever else the machine ran.", ""]
    lines += [f"Trials: {summary['trials']}. Pareto front (within budget on val): {summary['pareto']}.", ""]
    if chosen is None:
        lines += ["No trial is within the budget on val: nothing is chosen (trials.md lists what each lost).", ""]
    else:
        cost = (f"{chosen[RETIMED]:.3g} ms re-timed ({chosen['latency_ms']:.3g} ms timed alone), "
                f"{chosen['val_speedup']:.3g}x the teacher's re-timed val latency ({chosen['val_speedup_first']:.3g}x "
                "by the first timings)" if RETIMED in chosen else
                f"{chosen[summary['objective']]:.3g} {_UNITS[summary['objective']]}, {chosen['val_speedup']:.3g}x "
                "the teacher's val latency")
        lines += [f"Chosen on val: trial {chosen['trial']} ({_settings_text(chosen['settings'])}): val macro F1 "
                  f"{chosen['val_macro_f1']:.4f}, {cost}.", "",
                  f"Artifact: `{chosen['artifact']}`", "", "Reproduce it:", "", "```bash", chosen["command"], "```", ""]
    if summary["test"]:
        lines += ["## Test verdict (emocompress benchmark, once, after the choice; test_benchmark/)", "",
                  markdown_table(summary["test"], list(summary["test"][0])), ""]
    lines += ["## Trials (val)", "", markdown_table(rows, shown)]
    return "\n".join(lines)
