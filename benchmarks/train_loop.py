"""The Lightning ``fit`` loop against the bare training step, from pixels and from a latent
cache, on one machine in one run (issue 18's CPU measurements).

    .venv/bin/python -m benchmarks.train_loop [--config experiments/hand/tiny.yaml] [--steps 60]

The model and data come from the experiment config (EMA, validation, image grids and
checkpoints off in every variant). ``bare step``: ``losses`` + backward + gradient clipping +
AdamW + schedule on batches fetched beforehand; ``fit``: ``trainer.fit`` with the config's
loader, logger and progress bar, each step timed from one batch's start to the next's. Every
variant reports its median step after ``--warmup`` steps, and the median over ``--repeats``
rounds run round robin (the speed of two shared cores drifts over minutes and single steps
stall; the mean would measure the machine). The cache is written into a temporary folder
first. Rows of the ablation change one thing of the ``fit`` loop (loader workers, progress bar,
logger) to show where its extra time goes.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from benchmarks.report import emit, write_rows
from experiments.cache_latents import write_cache
from experiments.config import instantiate, load_config
from experiments.run import limit_threads
from lightning_modules.console_callbacks import StepProgressBar


class StepTimer(L.Callback):
    """The wall time of each step after ``warmup``: from one batch's start to the next's (the
    loader's wait, the step, hooks, logging and the progress bar)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.warmup:
            self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.starts)]


def typical(durations: list[float]) -> float:
    """The median step: a few steps slowed by the shared machine do not move it."""
    return statistics.median(durations)


def build(config: dict, cache: str | None, workers: int | None):
    data = {**config["data"], "params": dict(config["data"]["params"])}
    if cache is not None:
        data["params"]["latent_cache"] = cache
    if workers is not None:
        data["params"]["num_workers"] = workers
    model_node = {
        **config["model"],
        "params": {**config["model"]["params"], "ema": {"enabled": False}},
    }
    torch.manual_seed(0)
    return instantiate(model_node), instantiate(data)


def bare_step(config: dict, cache: str | None, steps: int, warmup: int) -> float:
    """Median seconds per step of the step alone (batches fetched beforehand)."""
    model, datamodule = build(config, cache, workers=0)
    batches = list(itertools.islice(iter(datamodule.train_dataloader()), steps + warmup))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    clip = config["trainer"].get("gradient_clip_val")
    model.train()
    durations = []
    for n, batch in enumerate(batches):
        start = time.perf_counter()
        loss = model.losses(batch, train=True, generator=torch.Generator().manual_seed(n))["loss"]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if n >= warmup:
            durations.append(time.perf_counter() - start)
    return typical(durations)


def loader_alone(config: dict, steps: int, warmup: int) -> float:
    """Median seconds per batch of the uncached training loader on its own (no workers)."""
    _, datamodule = build(config, None, workers=0)
    batches = iter(datamodule.train_dataloader())
    for _ in range(warmup):
        next(batches)
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        next(batches)
        durations.append(time.perf_counter() - start)
    return typical(durations)


def fit_loop(
    config: dict, cache: str | None, steps: int, warmup: int, workers: int | None = None,
    progress_bar: bool = True, logger: bool = True, log_dir: str = "",
) -> float:  # fmt: skip
    """Median seconds per step of ``trainer.fit``."""
    model, datamodule = build(config, cache, workers)
    timer = StepTimer(warmup)
    callbacks = [timer] + ([StepProgressBar()] if progress_bar else [])
    trainer_args = {
        k: v
        for k, v in config["trainer"].items()
        if k not in ("val_check_interval", "check_val_every_n_epoch")
    }
    trainer = L.Trainer(
        **{**trainer_args, "max_steps": steps + warmup},
        callbacks=callbacks,
        logger=L.pytorch.loggers.TensorBoardLogger(log_dir, name="loop") if logger else False,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    return typical(timer.durations())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="experiments/hand/tiny.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    threads = limit_threads()
    cfg, _ = load_config([args.config])
    config = OmegaConf.to_container(cfg, resolve=True)
    with tempfile.TemporaryDirectory() as folder:
        cache = str(Path(folder) / "cache")
        torch.manual_seed(0)
        model, datamodule = build(config, None, None)
        write_cache(model, datamodule, Path(cache), text=False, batch_size=32, per_shard=1000)
        n, w, d = args.steps, args.warmup, folder
        variants = {
            "bare step": lambda: bare_step(config, None, n, w),
            "fit": lambda: fit_loop(config, None, n, w, log_dir=d),
            "bare step, cached": lambda: bare_step(config, cache, n, w),
            "fit, cached": lambda: fit_loop(config, cache, n, w, log_dir=d),
            "fit, no loader workers": lambda: fit_loop(config, None, n, w, workers=0, log_dir=d),
            "fit, no progress bar": lambda: fit_loop(
                config, None, n, w, progress_bar=False, log_dir=d
            ),
            "fit, no logger": lambda: fit_loop(config, None, n, w, logger=False, log_dir=d),
            "fit, cached, no loader workers": lambda: fit_loop(
                config, cache, n, w, workers=0, log_dir=d
            ),
            "loader alone (no step)": lambda: loader_alone(config, n, w),
        }
        # round robin, the median per variant: the speed of two shared cores drifts by 10-20 %
        # over minutes, which consecutive repeats of one variant would take for its own cost
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, measure in variants.items():
                times[name].append(measure() * 1e3)
                emit({"variant": name, "ms_per_step": round(times[name][-1], 1)})
    rows = []
    for name, runs in times.items():
        runs = sorted(runs)
        rows.append({"variant": name, "ms_per_step": round(runs[len(runs) // 2], 1),
                     "runs_ms": [round(r, 1) for r in runs]})  # fmt: skip
    bare = {False: rows[0]["ms_per_step"], True: rows[2]["ms_per_step"]}
    runs = f"median of {args.repeats} runs of {n} steps after {w}"
    print(f"\n{args.config}, {threads} torch threads, {runs}\n")
    print("| variant | ms/step | × bare step |\n|---|---|---|")
    for row in rows:
        ratio = row["ms_per_step"] / bare["cached" in row["variant"]]
        shown = f"{ratio:.2f}" if "step" not in row["variant"] else "–"
        print(f"| {row['variant']} | {row['ms_per_step']:.1f} | {shown} |")
    fit_ratio = rows[1]["ms_per_step"] / rows[3]["ms_per_step"]
    print(f"\ncache speed-up: bare step {bare[False] / bare[True]:.2f}×, fit {fit_ratio:.2f}×")
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
