"""Reading Lightning checkpoints as data: never code, and with a clear message when it fails; and the labels
bound to a model's weights, which decide what its classes are called (``label_columns``, ``reorder_head``)."""

import os
import pickle
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from emocompress.io import atomic_file
from emocompress.models import pretrained
from emocompress.models.structure import fit_to_state_dict

# Class paths that version 0.1.0 wrote into run configs (config.yaml) and checkpoints (hyper_parameters' _class_path)
# before the package was split into subpackages. They are read as the current paths, so that its runs still resume
# and its checkpoints still load.
MOVED_CLASS_PATHS = {
    "emocompress.classifier.EmotionClassifier": "emocompress.models.classifier.EmotionClassifier",
    "emocompress.distillation.Distiller": "emocompress.compression.distillation.Distiller",
    "emocompress.data.EmotionDataModule": "emocompress.data.datamodule.EmotionDataModule",
    "emocompress.callbacks.pruning.MagnitudePruning": "emocompress.compression.pruning.MagnitudePruning",
    "emocompress.callbacks.structured_pruning.StructuredPruning":
        "emocompress.compression.structured_pruning.StructuredPruning",
    "emocompress.callbacks.quantization.Int8Quantization": "emocompress.compression.quantization.Int8Quantization",
}


def current_class_paths(value):
    """``value`` (a loaded config or hyper-parameters: dicts, lists and strings) with every class path of
    ``MOVED_CLASS_PATHS`` replaced by the current one.

    >>> current_class_paths({"model": {"class_path": "emocompress.distillation.Distiller"}, "seed": 1})
    {'model': {'class_path': 'emocompress.compression.distillation.Distiller'}, 'seed': 1}
    """
    if isinstance(value, dict):
        return {key: current_class_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [current_class_paths(item) for item in value]
    return MOVED_CLASS_PATHS.get(value, value) if isinstance(value, str) else value


def read_checkpoint(path: str) -> dict:
    """A Lightning checkpoint as plain data: ``torch.load(weights_only=True)`` never runs code from it.

    Raises:
        ValueError: ``path`` is missing, not a checkpoint, or holds objects other than plain data.
    """
    try:
        # mmap: tensors are paged in when used, so reading a 270 MB checkpoint for its epoch costs nothing
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        checkpoint["state_dict"]  # noqa: B018 (a Lightning checkpoint has one)
    except Exception as err:  # a foreign or truncated file fails deep in unpickling, with many error types
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise ValueError(f"refused to load {path}: it holds Python objects other than tensors and plain data, "
                             "which could run code when unpickled; only use checkpoints written by Lightning from "
                             "a source you trust") from err
        raise ValueError(f"cannot read a Lightning checkpoint from {path} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    return checkpoint


def checkpoint_max_length(path: str) -> int | None:
    """The ``data.max_length`` a Lightning checkpoint was trained with (its datamodule hyper-parameters), or None."""
    return read_checkpoint(path).get("datamodule_hyper_parameters", {}).get("max_length")


def label_columns(model_labels: list[str], data_labels: list[str], where: str) -> list[int]:
    """For each of the data's labels, the model's class id of the label with that name: the column of the
    model's logits that belongs to it. The labels stored with the weights are the truth; the same labels in
    another order are matched by name, never by position.

    Args:
        model_labels: the labels stored with the weights, in class id order.
        data_labels: the data's labels (``data.labels``, else the sorted train labels), in class id order.
        where: the file that stores ``model_labels``, for the message.

    Raises:
        ValueError: the two are not the same set of labels (a class renamed, added or dropped).

    >>> label_columns(["anger", "joy", "love"], ["love", "anger", "joy"], "best.ckpt")
    [2, 0, 1]
    >>> label_columns(["anger", "joy"], ["anger", "fear"], "best.ckpt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: best.ckpt: the model was trained on the labels ['anger', 'joy'], but the data's labels are ...
    """
    model_labels, data_labels = list(model_labels), list(data_labels)
    if sorted(model_labels) != sorted(data_labels):
        raise ValueError(f"{where}: the model was trained on the labels {model_labels}, but the data's labels are "
                         f"{data_labels}; use the data and labels the model was trained with (its label names in "
                         f"the data, or --data.labels {model_labels}), or a model trained on these labels")
    return [model_labels.index(label) for label in data_labels]


def _head_name(model: nn.Module) -> str:
    """The name of the classification head's output layer in ``model``: the last ``nn.Linear`` with one output
    per label (``classifier``, RoBERTa's ``classifier.out_proj``, a small-encoder student's ``classifier``)."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module.out_features == model.config.num_labels]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear classification head with {model.config.num_labels} "
                         "outputs whose classes could be reordered; give the labels in the model's order "
                         f"(--data.labels {list(model.config.id2label.values())})")
    return names[-1]


def reorder_head(model: nn.Module, columns: list[int], state: dict | None = None, prefix: str = "") -> None:
    """Reorder the classes of ``model``'s classification head: class ``i`` becomes the old class ``columns[i]``
    (see ``label_columns``), so that its logits come in the data's label order, to the same numbers.

    Args:
        model: the network; its own weights are reordered unless ``state`` is given.
        columns: the old class id of each new one.
        state: a state dict of ``model`` (keys with ``prefix``, as in a Lightning checkpoint's ``model.``) to
            reorder in place instead, before it is loaded.
    """
    if columns == list(range(len(columns))):
        return
    name = prefix + _head_name(model)
    target = model.state_dict() if state is None else state
    reordered = {key: target[key][columns] for key in (f"{name}.weight", f"{name}.bias") if key in target}
    if state is None:
        model.load_state_dict(reordered, strict=False)
    else:
        state.update(reordered)


def stored_labels(id2label: dict | None) -> list[str] | None:
    """The label names of a stored ``id2label`` (ids as ints or strings) in class id order; None if absent."""
    return [id2label[i] for i in sorted(id2label, key=int)] if id2label else None


def saved_head_columns(name_or_path: str, data_labels: list[str], trust_remote_code: bool = False) -> list[int]:
    """``label_columns`` of the labels in a saved model's ``config.json`` (an ``hf_model`` export, whose trained
    head is reused) against the data's; none to map when they are transformers' placeholder names
    (``LABEL_0``...), which name no class.

    Raises:
        ValueError: the saved labels are not the data's (``label_columns``).
    """
    path = pretrained.resolve(name_or_path)
    config = pretrained.load_config(path, trust_remote_code=trust_remote_code)
    trained_on = stored_labels(config.id2label)
    if trained_on == [f"LABEL_{i}" for i in range(len(trained_on))]:
        return list(range(len(data_labels)))
    where = Path(path, "config.json") if Path(path).is_dir() else path
    return label_columns(trained_on, data_labels, str(where))


def match_checkpoint_classes(model: nn.Module, checkpoint: dict, data_labels: list[str], where: str,
                             resuming: bool = False) -> None:
    """Reorder a loaded Lightning checkpoint of ``model`` (its ``model.*`` head and its per-class
    ``class_weights``), in place before its weights load, so that its classes, the labels it was trained on,
    come in the order of ``data_labels``, matched by name (``label_columns``). Nothing to do for a checkpoint
    without stored labels.

    Args:
        where: the checkpoint's path, for messages.
        resuming: the checkpoint resumes a fit; its optimizer's moments are kept by class id, and stay in the
            order they were trained in, so the labels must come in that order.

    Raises:
        ValueError: the checkpoint was trained on other labels, or, when ``resuming``, in another order.
    """
    trained_on = stored_labels(checkpoint.get("hyper_parameters", {}).get("id2label"))
    if not trained_on:
        return
    columns = label_columns(trained_on, data_labels, where)
    if resuming and columns != sorted(columns):
        raise ValueError(f"{where}: the run was trained with the labels in the order {trained_on}; resume "
                         f"it with that order, --data.labels {trained_on}")
    state = checkpoint["state_dict"]
    reorder_head(model, columns, state, prefix="model.")
    if "class_weights" in state:
        state["class_weights"] = state["class_weights"][columns]


def load_network(model: nn.Module, path: str, id2label: dict[int, str] | None = None) -> None:
    """Load the ``model.*`` weights of an ``EmotionClassifier`` (or ``Distiller``) checkpoint into ``model``.

    Args:
        id2label: the labels ``model`` predicts; the checkpoint's classes are matched to them by name
            (``label_columns``). None loads them by position.

    Raises:
        ValueError: the checkpoint cannot be read, was trained on other labels, or its weights do not fit ``model``.
    """
    checkpoint = read_checkpoint(path)
    if id2label:
        match_checkpoint_classes(model, checkpoint, stored_labels(id2label), path)
    network = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    fit_to_state_dict(model, network)  # a structurally pruned run's checkpoint has smaller layers
    try:
        model.load_state_dict(network)
    except RuntimeError as err:  # missing, unexpected or differently shaped weights
        raise ValueError(f"{path} does not fit {type(model).__name__} with {model.config.num_labels} labels; "
                         f"use the data and model of the run that made it ({err})") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but a local checkpoint is written to a temporary file in its own folder and put
    in place with ``os.replace``. Lightning 2.6 (``_atomic_save``) writes through an fsspec transaction whose
    temporary file lies in the system temp dir: moving it into a run folder on another filesystem is a copy,
    which a full disk cuts short, leaving a truncated ``best-*.ckpt`` where the earlier file was."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(Path(path), "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        return None
