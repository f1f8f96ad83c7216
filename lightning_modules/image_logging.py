"""Sample grids in TensorBoard at a fixed interval, from a fixed batch with a fixed seed."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid


def side_by_side(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """One row per example, one column per entry: ``[3, rows*H, cols*W]`` in [0, 1].

    Entries are ``[B, C, H, W]`` in [0, 1] with C in {1, 3}; 1-channel maps become grey.
    """
    tiles = [t.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1) for t in columns.values()]
    stacked = torch.stack(tiles, dim=1).flatten(0, 1)  # [B*cols, 3, H, W], row-major
    return make_grid(stacked, nrow=len(tiles), padding=2, pad_value=1.0)


class ImageGridLogger(L.Callback):
    """Every ``every_n_steps`` optimiser steps (and at the end), sample from the module's
    ``log_images(batch, generator)`` and log the grid as ``samples/<col>|<col>|...``.

    The batch is the first validation batch (or the first training batch if there is no
    validation data), cut to ``num_images`` and kept, and the generator is reseeded with
    ``seed`` each time, so grids from different steps and runs are comparable by eye.
    """

    def __init__(self, every_n_steps: int = 500, num_images: int = 4, seed: int = 0):
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self._batch: dict | None = None
        self._last_step = -1

    def _fixed_batch(self, trainer, batch: dict) -> dict | None:
        if self._batch is None:
            source = batch
            loaders = trainer.val_dataloaders
            if isinstance(loaders, list | tuple):
                loaders = loaders[0] if loaders else None
            if loaders is not None:
                source = next(iter(loaders))
            if "image" not in source:  # a latent cache's batch: nothing to draw from
                return None
            n = self.num_images
            self._batch = {
                k: (v[:n].cpu() if isinstance(v, torch.Tensor) else list(v[:n]))
                for k, v in source.items()
            }
        return self._batch

    @rank_zero_only
    def _log(self, trainer, pl_module, batch: dict) -> None:
        if trainer.logger is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        fixed = self._fixed_batch(trainer, batch)
        if fixed is None:
            return
        on_device = {
            k: (v.to(pl_module.device) if isinstance(v, torch.Tensor) else v)
            for k, v in fixed.items()
        }
        was_training = pl_module.training
        pl_module.eval()
        # Sample under the run's precision (autocast for *-mixed), as training does.
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            columns = pl_module.log_images(on_device, torch.Generator().manual_seed(self.seed))
        pl_module.train(was_training)
        writer = trainer.logger.experiment
        writer.add_image("samples/" + "|".join(columns), side_by_side(columns), trainer.global_step)
        if "caption" in fixed:
            captions = "\n".join(f"{i}. {c}" for i, c in enumerate(fixed["caption"]))
            writer.add_text("samples/captions", captions, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch is None and trainer.is_global_zero:
            self._fixed_batch(trainer, batch)
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self._log(trainer, pl_module, batch)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._batch is not None:
            self._log(trainer, pl_module, self._batch)
