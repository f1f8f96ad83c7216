"""Checkpoint files: written whole or not at all, read as data only, found for resuming."""

from __future__ import annotations

import glob
import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from experiments.config import ConfigError

log = logging.getLogger("experiments.checkpoints")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its destination folder and renames it
    over the old one, so that a run killed while saving leaves the previous file intact
    (Lightning writes in place: a kill mid-save left a 0-byte ``last.ckpt``)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own (fsspec) writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def complete(path: str | os.PathLike) -> bool:
    """Whether a checkpoint file is whole: torch saves a zip archive, whose directory is
    written last, so a truncated file has none."""
    return os.path.getsize(path) > 0 and zipfile.is_zipfile(path)


def find_last_checkpoint(container: dict) -> Path | None:
    """The newest complete checkpoint (``last.ckpt`` or ``step*.ckpt``) of any
    ``<save_dir>/<name>/version_*/checkpoints/``; damaged newer ones are named and passed over."""
    save_dir = ((container.get("logger") or {}).get("params") or {}).get("save_dir", "logs")
    candidates = glob.glob(
        os.path.join(save_dir, container["name"], "version_*", "checkpoints", "*.ckpt")
    )
    # newest first; on an mtime tie (coarse file-system clocks) last.ckpt, then the higher step
    newest = sorted(
        candidates,
        key=lambda p: (os.path.getmtime(p), Path(p).name == "last.ckpt", Path(p).name),
        reverse=True,
    )
    for path in newest:
        if complete(path):
            return Path(path)
        log.warning("checkpoint %s is damaged (incomplete file): passed over", path)
    return None


def read_checkpoint(ckpt_path: str | os.PathLike, mmap: bool = False) -> dict:
    """A checkpoint's contents, unpickled with ``weights_only=True``: tensors, containers and
    numbers, which is all a handdiff checkpoint holds; a file whose pickle asks for anything
    else (which could run code) is refused, as is one that is not a checkpoint at all.
    ``mmap=True`` maps tensors instead of reading them (for a look at the metadata)."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"checkpoint {str(ckpt_path)!r} holds more than weights and was not loaded "
            f"(a pickle can run code): {reason}"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError(f"checkpoint {str(ckpt_path)!r} cannot be read: {exc}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {str(ckpt_path)!r} is not a handdiff checkpoint")
    return checkpoint
