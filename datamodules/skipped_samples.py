"""Report skipped samples: TensorBoard scalars during training, a summary at the end."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.schema import SKIP_REASONS


class SkippedSampleMonitor(L.Callback):
    """Sums the ``skipped`` counts that travel in training batches (see ``SkipCounter``).

    Logs ``data/skipped_<reason>`` and ``data/skipped_total`` (summed over ranks, cumulative,
    carried over a resume in the checkpoint) every ``log_every_n_steps`` and warns with the
    totals when training ends.
    """

    def __init__(self, log_every_n_steps: int = 50):
        self.log_every_n_steps = log_every_n_steps
        self.totals = torch.zeros(len(SKIP_REASONS), dtype=torch.long)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        # The totals over all ranks go into checkpoints so that a resumed run keeps counting.
        # Lightning builds a checkpoint's contents on every rank, so the reduce is collective.
        trainer = getattr(self, "_trainer", None)
        totals = self._global_totals(trainer) if trainer is not None else self.totals
        return {"totals": totals.clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        # rank 0 carries the earlier totals, the others start from zero: the sum is right
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.totals = state_dict["totals"].clone() if rank == 0 else torch.zeros_like(self.totals)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "skipped" in batch:
            self.totals += batch["skipped"].sum(0).cpu()
        if trainer.global_step % self.log_every_n_steps == 0:
            self._log(trainer)

    def _global_totals(self, trainer) -> torch.Tensor:
        # Every rank must reach this reduce; callbacks run on all ranks.
        return trainer.strategy.reduce(
            self.totals.clone().to(trainer.strategy.root_device), reduce_op="sum"
        ).cpu()

    def _log(self, trainer) -> torch.Tensor:
        totals = self._global_totals(trainer)
        if trainer.logger is not None:
            metrics = {
                f"data/skipped_{r}": float(n) for r, n in zip(SKIP_REASONS, totals, strict=False)
            }
            metrics["data/skipped_total"] = float(totals.sum())
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        return totals

    def on_train_end(self, trainer, pl_module) -> None:
        totals = self._log(trainer)
        if totals.sum() == 0:
            rank_zero_info("data: no sample was skipped")
            return
        detail = ", ".join(f"{r}={int(n)}" for r, n in zip(SKIP_REASONS, totals, strict=False) if n)
        rank_zero_warn(
            f"data: skipped {int(totals.sum())} bad sample(s) ({detail}); the log names each one"
        )
