"""The search space and the accuracy budget of ``emocompress compress``, read from its YAML and checked.

A space is a list of dimensions; a dimension is a choice between options; an option is config overlays (``-c``
files of the existing recipes) and command-line arguments stacked onto the trial's fit, in dimension order. So the
space is open to anything a config overlay can express: an option whose overlay files do not exist yet (a backend
another branch is adding) is listed as not available and left out, instead of failing the search.

    space:
      - name: student
        options:
          layers3: {args: [--model.init_args.student_layers, "[1, 3, 5]"]}
          cnn: {configs: [configs/recipes/distill_bilstm.yaml, configs/recipes/distill_cnn_vocab.yaml]}
      - name: prune
        when: {student: [layers3]}       # only for these students; for the others it adds nothing
        options:
          none: {}
          "0.5": {configs: [configs/recipes/structured_prune.yaml], args: [...]}
      - name: int8
        after_fit: true                  # applied to a fitted model at test time: reuses a sibling's fit
        options:
          fp32: {}
          onnxruntime: {configs: [configs/overlays/quantize.yaml], artifact: int8}

Every refusal is one ``ValueError`` line naming the key (``space[1].when``, ``budget.max_macro_f1_drop``).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

# The run subfolders a trial's model can be measured from: the fp32 export, or an INT8 artifact folder (ONNX
# Runtime's, configs/overlays/quantize.yaml, or OpenVINO's, configs/overlays/openvino.yaml).
ARTIFACTS = ("hf_model", "int8", "openvino_int8")
_OPTION_KEYS = {"configs", "args", "model_name", "artifact", "requires"}
_DIMENSION_KEYS = {"name", "options", "when", "after_fit"}


@dataclass(frozen=True)
class Option:
    """One choice of a dimension: ``-c`` files and arguments for the fit, in that order.

    ``model_name`` replaces the student's ``model.model_name`` (default: the teacher, whose tokenizer the student
    reads); ``artifact`` is the run subfolder measured when this option is chosen (the last one set wins). In the
    YAML an option may also list ``requires``: paths it reads that another command makes (a vocabulary); while one
    is missing the option is not available, like one whose configs are missing."""
    name: str
    configs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    model_name: str | None = None
    artifact: str | None = None


@dataclass(frozen=True)
class Dimension:
    name: str
    options: dict[str, Option]
    when: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other dimension -> its options that enable this
    unavailable: dict[str, list[str]] = field(default_factory=dict)  # option -> its missing files
    # post-training: its options are applied to a fitted model by `emocompress test` (configs/overlays/quantize.yaml
    # quantizes when test starts), so settings that differ only here share one fit
    after_fit: bool = False

    def applies(self, settings: dict[str, str]) -> bool:
        """Whether this dimension is chosen (and adds its option to the fit) given the ``settings`` before it."""
        return all(settings.get(dim) in allowed for dim, allowed in self.when.items())


@dataclass(frozen=True)
class Budget:
    """What a model must keep, on val, against the teacher; what is minimized; how long the search may take.

    Args:
        max_macro_f1_drop: the most macro F1 (a fraction: 0.01 is 1 point) lost against the teacher.
        max_class_f1_drop: the most any one class's F1 may be lost; null: no limit per class.
        min_rare_recall: the least recall of the rarest class of the val split; null: no limit.
        objective: ``latency`` (median ms per call at ``batch_size``) or ``size`` (MB of the weights file).
        batch_size: the batch size latency is measured at (1: one text at a time, as a server does).
        latency_samples: calls timed per model (after ``warmup`` untimed ones).
        warmup: untimed calls before timing.
        retime_rounds: with ``objective: latency``, before choosing, the teacher and every trial within budget
            are timed again together in this many interleaved rounds (``latency_samples`` calls each per round),
            and the choice uses those times: each trial's first timing, taken alone when it ended, moves with
            whatever else the machine did then.
        n_trials: finished trials (kept or stopped early), counted over resumptions too; null: no limit.
        timeout_min: wall-clock minutes of this invocation's search; null: no limit (one of the two is needed).
        early_stop_epoch: from this epoch (from 1) on, a trial whose val macro F1 is below the budget by more than
            ``early_stop_margin`` is stopped as hopeless (``search.stopping.HopelessTrialStop``).
        early_stop_margin: how far below the budget's macro F1 a trial may be and still go on training.
    """
    max_macro_f1_drop: float
    max_class_f1_drop: float | None = None
    min_rare_recall: float | None = None
    objective: Literal["latency", "size"] = "latency"
    batch_size: int = 1
    latency_samples: int = 100
    warmup: int = 10
    retime_rounds: int = 5
    n_trials: int | None = None
    timeout_min: float | None = None
    early_stop_epoch: int = 1
    early_stop_margin: float = 0.05


def read_budget(budget: dict | None) -> Budget:
    """``budget:`` of the search config as a ``Budget``, or a one-line ``ValueError`` naming the key."""
    if not budget:
        raise ValueError("budget: empty; give at least budget.max_macro_f1_drop and budget.n_trials or "
                         "budget.timeout_min (configs/compress.yaml shows every key)")
    unknown = set(budget) - set(Budget.__dataclass_fields__)
    if unknown:
        raise ValueError(f"budget.{sorted(unknown)[0]}: unknown key; give some of "
                         f"{', '.join(Budget.__dataclass_fields__)}")
    if "max_macro_f1_drop" not in budget:
        raise ValueError("budget.max_macro_f1_drop: missing; give the most macro F1 to lose against the teacher "
                         "(0.01 is 1 point)")
    # `--budget.timeout_min 30` reaches here as the string '30' (the budget is a plain dict to jsonargparse):
    # read a string value as YAML, as the config file's values were read
    b = Budget(**{k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in budget.items()})
    for key in ("max_macro_f1_drop", "max_class_f1_drop", "early_stop_margin"):
        value = getattr(b, key)
        if value is not None and not (isinstance(value, int | float) and 0 <= value <= 1):
            raise ValueError(f"budget.{key}: {value!r}; give a fraction of F1 in [0, 1] (0.01 is 1 point)")
    if b.min_rare_recall is not None and not (isinstance(b.min_rare_recall, int | float)
                                              and 0 <= b.min_rare_recall <= 1):
        raise ValueError(f"budget.min_rare_recall: {b.min_rare_recall!r}; give a recall in [0, 1], or null")
    if b.objective not in ("latency", "size"):
        raise ValueError(f"budget.objective: {b.objective!r}; give latency or size")
    for key, least in (("batch_size", 1), ("latency_samples", 1), ("warmup", 0), ("early_stop_epoch", 1),
                        ("retime_rounds", 1)):
        value = getattr(b, key)
        if not isinstance(value, int) or value < least:
            raise ValueError(f"budget.{key}: {value!r}; give an integer of at least {least}")
    if b.n_trials is None and b.timeout_min is None:
        raise ValueError("budget: neither n_trials nor timeout_min is set, so the search would never end; give "
                         "budget.n_trials, budget.timeout_min or both")
    if b.n_trials is not None and (not isinstance(b.n_trials, int) or b.n_trials < 1):
        raise ValueError(f"budget.n_trials: {b.n_trials!r}; give a positive integer, or null")
    if b.timeout_min is not None and not (isinstance(b.timeout_min, int | float) and 0 < b.timeout_min < math.inf):
        raise ValueError(f"budget.timeout_min: {b.timeout_min!r}; give a positive number of minutes, or null")
    return b


def _path(file: str, root: Path) -> str:
    path = Path(file)
    return str(path if path.is_absolute() else (root / path).resolve())


def _option(name: str, spec: dict | None, where: str, root: Path) -> tuple[Option, list[str]]:
    """The option and the files it names that do not exist."""
    spec = spec or {}
    if not isinstance(spec, dict) or set(spec) - _OPTION_KEYS:
        raise ValueError(f"{where}: give a mapping with some of {', '.join(sorted(_OPTION_KEYS))}, got {spec!r}")
    configs = [_path(file, root) for file in spec.get("configs") or []]
    if spec.get("artifact") not in (None, *ARTIFACTS):
        raise ValueError(f"{where}.artifact: {spec['artifact']!r}; give one of {', '.join(ARTIFACTS)}")
    # its overlays, and what it reads that another command makes (a student vocabulary folder)
    missing = [file for file in configs if not Path(file).is_file()]
    missing += [path for path in map(lambda p: _path(p, root), spec.get("requires") or []) if not Path(path).exists()]
    option = Option(str(name), tuple(configs), tuple(str(a) for a in spec.get("args") or []), spec.get("model_name"),
                    spec.get("artifact"))
    return option, missing


def read_space(space: list[dict] | None, root: str | Path = ".") -> list[Dimension]:
    """``space:`` of the search config as dimensions with their available options; config paths are relative to
    ``root`` (where the command runs, as for ``-c``). Refuses, naming the key: an empty space, a dimension without
    options or with none available, duplicate names, a ``when`` naming an unknown or later dimension or an option it
    does not have."""
    if not space:
        raise ValueError("space: empty; give a list of dimensions, each with a name and options "
                         "(configs/compress.yaml shows one)")
    if not isinstance(space, list):
        raise ValueError(f"space: give a list of dimensions, got {type(space).__name__}")
    root = Path(root)
    dimensions: list[Dimension] = []
    for i, spec in enumerate(space):
        where = f"space[{i}]"
        if not isinstance(spec, dict) or set(spec) - _DIMENSION_KEYS or "name" not in spec:
            raise ValueError(f"{where}: give a mapping with name, options (and optionally when, after_fit), "
                             f"got {spec!r}")
        name = str(spec["name"])
        where = f"space[{i}] ({name})"
        if name in (d.name for d in dimensions):
            raise ValueError(f"{where}.name: {name!r} is given twice; name each dimension once")
        after_fit = spec.get("after_fit", False)
        if not isinstance(after_fit, bool):
            raise ValueError(f"{where}.after_fit: {after_fit!r}; give true (its options are applied to a fitted model "
                             "at test time, as INT8 is) or false")
        if not spec.get("options") or not isinstance(spec["options"], dict):
            raise ValueError(f"{where}.options: empty; give at least one option (name: its configs and args)")
        options, unavailable = {}, {}
        for option_name, option_spec in spec["options"].items():
            option, missing = _option(option_name, option_spec, f"{where}.options.{option_name}", root)
            if missing:
                unavailable[option.name] = missing
            else:
                options[option.name] = option
        if not options:
            raise ValueError(f"{where}.options: none is available (missing files: "
                             f"{sorted(f for files in unavailable.values() for f in files)}); fix the paths")
        when = {}
        for other, allowed in (spec.get("when") or {}).items():
            earlier = next((d for d in dimensions if d.name == other), None)
            if earlier is None:
                raise ValueError(f"{where}.when.{other}: not a dimension listed before {name!r}; a condition can "
                                 "only name an earlier dimension")
            allowed = [str(a) for a in ([allowed] if isinstance(allowed, str) else allowed or [])]
            known = set(earlier.options) | set(earlier.unavailable)
            if not allowed or set(allowed) - known:
                raise ValueError(f"{where}.when.{other}: {allowed}; give options of {other} "
                                 f"({', '.join(sorted(known))})")
            when[str(other)] = tuple(allowed)
        dimensions.append(Dimension(name, options, when, unavailable, after_fit))
    return dimensions


def check_settings(dimensions: list[Dimension], settings: dict, where: str) -> dict[str, str]:
    """``settings`` (dimension -> option, as in ``first:``) checked: the dimensions that apply, each with an available
    option; a ``ValueError`` naming ``where`` for an unknown dimension or option, a missing one, or one given where
    its ``when`` does not hold."""
    by_name = {d.name: d for d in dimensions}
    unknown = set(settings) - set(by_name)
    if unknown:
        raise ValueError(f"{where}.{sorted(unknown)[0]}: not a dimension of the space ({', '.join(by_name)})")
    full: dict[str, str] = {}
    for dim in dimensions:
        value = str(settings[dim.name]) if dim.name in settings else None
        if not dim.applies(full):
            if value is not None:
                raise ValueError(f"{where}.{dim.name}: {value!r} contradicts space {dim.name}.when "
                                 f"{dict(dim.when)}; leave it out")
            continue
        if value is None:
            raise ValueError(f"{where}.{dim.name}: missing; give one of {', '.join(dim.options)}")
        if value not in dim.options:
            raise ValueError(f"{where}.{dim.name}: {value!r} is not an available option ({', '.join(dim.options)})")
        full[dim.name] = value
    return full


def fit_key(dimensions: list[Dimension], settings: dict[str, str]) -> tuple:
    """What a setting's fit depends on: its options of the dimensions that are not ``after_fit``. Settings with
    the same key are siblings: one fitted model, tested with different post-training options."""
    trained = {d.name for d in dimensions if not d.after_fit}
    return tuple(sorted((k, v) for k, v in settings.items() if k in trained))


def unavailable_lines(dimensions: list[Dimension]) -> list[str]:
    """One line per option left out because its overlay files do not exist (yet)."""
    return [f"{d.name}={option}: not available yet (missing {', '.join(files)})"
            for d in dimensions for option, files in d.unavailable.items()]
