"""What a training run shows on the console: a progress bar without a negative epoch total
when training is step-bound, and a parameter summary without Lightning's FLOP column (always
0 here: the methods take dict batches, so Lightning has no example input to count FLOPs on)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import summarize
from rich.console import Console
from rich.table import Table


class StepProgressBar(RichProgressBar):
    """Rich progress bar: "Epoch 3" where Lightning writes "Epoch 3/-2" (a step-bound run has
    ``max_epochs`` -1), and no ``v_num`` (the TensorBoard version, shown as a float)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # reading the logged losses is a host synchronisation on a GPU: during training only
        # every refresh_rate steps (Rich's bar would read them after every batch)
        if trainer.training and trainer.global_step % max(self.refresh_rate, 1):
            return
        super()._update_metrics(trainer, pl_module)


class ParameterSummary(ModelSummary):
    """Top-level modules with their parameters and train/eval mode, and the totals."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        summary = summarize(pl_module, max_depth=1)
        table = Table(title=None, header_style="bold")
        for column in ("Name", "Type", "Params", "Mode"):
            table.add_column(column)
        for name, kind, params, training in zip(
            summary.layer_names, summary.layer_types, summary.param_nums, summary.training_modes,
            strict=True,
        ):  # fmt: skip
            table.add_row(name, kind, f"{params:,}", "train" if training else "eval")
        console = Console()
        console.print(table)
        console.print(
            f"trainable {summary.trainable_parameters:,} of {summary.total_parameters:,} "
            f"parameters ({summary.model_size:.1f} MB)"
        )
