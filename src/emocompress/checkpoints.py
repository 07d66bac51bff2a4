"""Reading Lightning checkpoints as data: never code, and with a clear message when it fails."""

import os
import pickle
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from emocompress.outputs import atomic_file
from emocompress.structure import fit_to_state_dict


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


def load_network(model: nn.Module, path: str) -> None:
    """Load the ``model.*`` weights of an ``EmotionClassifier`` (or ``Distiller``) checkpoint into ``model``.

    Raises:
        ValueError: the checkpoint cannot be read, or its weights do not fit ``model``.
    """
    state = read_checkpoint(path)["state_dict"]
    network = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
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
