"""Command-line entry point.

    .venv/bin/python -m experiments.run fit experiments/hand/tiny.yaml [more.yaml] [key=value ...]
    .venv/bin/python -m experiments.run validate CONFIG [key=value ...]
    .venv/bin/python -m experiments.run export CONFIG ckpt_path=last export_dir=exports/hand
    .venv/bin/python -m experiments.run eval experiments/eval/metrics_tiny.yaml [key=value ...]
    .venv/bin/python -m experiments.run predict experiments/two_stage/tiny.yaml [key=value ...]
    .venv/bin/python -m experiments.run print CONFIG [key=value ...]

Arguments with ``=`` are OmegaConf dotlist overrides; the others are config files, merged in
order (e.g. an ``experiments/debug/`` overlay after the experiment).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
from pathlib import Path

import cv2
import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from torch.utils.tensorboard.summary import hparams

from experiments.checkpoints import AtomicCheckpointIO, find_last_checkpoint, read_checkpoint
from experiments.config import (
    ConfigError,
    Provenance,
    flatten,
    import_target,
    instantiate,
    load_config,
)
from experiments.notices import configure_logging

log = logging.getLogger("experiments.run")


def make(node: dict, **extra):
    """:func:`~experiments.config.instantiate`, handing a target that loads trained
    experiments (the predictors: ``load_experiment``) :func:`load_module`."""
    if "load_experiment" in inspect.signature(import_target(node["target"])).parameters:
        extra.setdefault("load_experiment", load_module)
    return instantiate(node, **extra)


def _build(section: str, node: dict, provenance: Provenance):
    try:
        return make(node)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"building '{section}' ({node['target']}, in {provenance.where(section)}) failed: {exc}"
        ) from exc


def resolve_checkpoint(container: dict) -> str | None:
    """``ckpt_path``, with ``last`` turned into the newest ``last.ckpt`` of this run name (or
    None when there is none yet, so that a first run starts from scratch)."""
    path = container.get("ckpt_path")
    if path != "last":
        return path
    last = find_last_checkpoint(container)
    if last is None:
        log.warning(
            "ckpt_path=last: no checkpoint of %r yet, starting from scratch", container["name"]
        )
        return None
    if rank_zero_only.rank == 0:  # said plainly: "last" is whichever run of this name saved last
        saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(last.stat().st_mtime))
        step = read_checkpoint(last, mmap=True)["global_step"]
        print(f"ckpt_path=last: {last} (step {step}, saved {saved}); pin a run with ckpt_path=PATH")
    return str(last)


def build(cfg, provenance: Provenance):
    """Model, datamodule, trainer and the checkpoint to resume from (nothing runs yet).

    Resuming continues the TensorBoard run the checkpoint belongs to.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    L.seed_everything(container.get("seed", 0), workers=True)
    ckpt_path = resolve_checkpoint(container)
    datamodule = _build("data", container["data"], provenance)
    model = _build("model", container["model"], provenance)
    if getattr(datamodule, "latent_cache", None):
        if not hasattr(model, "latent_cache_tensors"):
            raise ConfigError(
                f"data.params.latent_cache: {type(model).__name__} trains from pixels only "
                "(the hand generator, the ControlNet baseline and HumanSD take caches)"
            )
        try:
            datamodule.check_cache_encoder(model.cache_identity(text=datamodule.cache_holds_text))
        except ValueError as exc:
            raise ConfigError(f"data.params.latent_cache: {exc}") from None
    logger = False
    if container.get("logger"):
        node = container["logger"]
        if ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
            params = {**(node.get("params") or {}), "version": Path(ckpt_path).parent.parent.name}
            if node["target"].endswith("TensorBoardLogger"):
                # events of steps replayed after the checkpoint are dropped, not duplicated
                params["purge_step"] = read_checkpoint(ckpt_path, mmap=True)["global_step"]
            node = {**node, "params": params}
        logger = _build("logger", node, provenance)
    callbacks = [
        _build(f"callbacks.{name}", node, provenance)
        for name, node in (container.get("callbacks") or {}).items()
        if node is not None
    ]
    trainer_args = dict(container["trainer"])
    if trainer_args.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    plugins = trainer_args.pop("plugins", None) or []
    plugins = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]
    trainer = L.Trainer(**trainer_args, logger=logger, callbacks=callbacks, plugins=plugins)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(flatten(container))
    return model, datamodule, trainer, ckpt_path


# the metrics TensorBoard's HPARAMS tab shows beside each run's settings
HPARAM_METRICS = ("train/loss", "val/loss")


@rank_zero_only
def write_hparams_tab(logger, params: dict, resumed: bool) -> None:
    """A training run's flattened config in TensorBoard's HPARAMS tab (Lightning adds the tab
    only with metric values, which a run starting has not got: the tab is written with the
    metric tags alone, read from the scalars as they come). On resume the run's
    ``hparams.yaml`` is rewritten (Lightning keeps the first one: a new ``max_steps`` would not
    show). Called when training starts: it opens the run's event file."""
    if not isinstance(logger, TensorBoardLogger):
        return
    plain = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}
    for summary in hparams(plain, dict.fromkeys(HPARAM_METRICS, 0.0)):
        logger.experiment._get_file_writer().add_summary(summary)
    if resumed:
        save_hparams_to_yaml(Path(logger.log_dir) / "hparams.yaml", logger.hparams)


def load_trained(model: L.LightningModule, ckpt_path: str) -> L.LightningModule:
    """Load a handdiff checkpoint (trained weights + EMA) into a freshly built module."""
    checkpoint = read_checkpoint(ckpt_path)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    log.info("loaded %s (step %s)", ckpt_path, checkpoint.get("global_step"))
    return model


def load_module(config_path: str, ckpt_path: str | None, overrides: list[str] = ()):
    """The model of an experiment config, with ``ckpt_path`` (a file or ``last``: the newest
    ``last.ckpt`` of the config's run name) loaded and its EMA weights, if any, baked in for
    sampling. Returns ``(model, config container)``."""
    cfg, provenance = load_config([config_path], overrides)
    container = OmegaConf.to_container(cfg, resolve=True)
    model = _build("model", container["model"], provenance)
    if ckpt_path == "last":
        last = find_last_checkpoint(container)
        if last is None:
            raise ConfigError(
                f"no checkpoint of {container['name']!r} yet ({config_path}): train it first"
            )
        ckpt_path = str(last)
    if ckpt_path:
        load_trained(model, ckpt_path)
    model.bake_ema()
    return model.eval(), container


def export(cfg, model: L.LightningModule, ckpt_path: str | None) -> Path:
    """Load ``ckpt_path`` into ``model`` and write it in diffusers format to ``export_dir``."""
    if not ckpt_path:
        raise ConfigError("export needs ckpt_path=<file> (or 'last' with an existing last.ckpt)")
    if not cfg.get("export_dir"):
        raise ConfigError("export needs export_dir=<folder>")
    load_trained(model, ckpt_path)
    out = model.export_diffusers(cfg.export_dir)
    log.info("exported %s to %s", ckpt_path, out)
    return out


def limit_threads() -> int:
    """Threads per process: ``HANDDIFF_THREADS`` when set, else torch's default (the physical
    cores) divided among the processes this machine runs (``LOCAL_WORLD_SIZE`` under DDP);
    OpenCV single-threaded, since its work runs in DataLoader workers that are parallel
    already (torch sets its own threads to 1 in each worker)."""
    threads = int(
        os.environ.get("HANDDIFF_THREADS")
        or max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    )
    torch.set_num_threads(threads)
    if os.environ.get("HANDDIFF_THREADS"):  # Lightning's DDP launcher keeps a set count
        os.environ["OMP_NUM_THREADS"] = str(threads)
    cv2.setNumThreads(1)
    return threads


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog=".venv/bin/python -m experiments.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command", choices=("fit", "validate", "eval", "predict", "export", "print")
    )
    parser.add_argument("args", nargs="+", help="config files and key=value overrides")
    ns = parser.parse_args(argv)
    limit_threads()
    configure_logging()
    overrides = [a for a in ns.args if "=" in a]
    files = [a for a in ns.args if "=" not in a]
    if not files:
        parser.error("give at least one config file")
    try:
        cfg, provenance = load_config(files, overrides)
        if ns.command == "print":
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return {}
        if ns.command in ("predict", "eval") and cfg.get("ckpt_path"):
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path!r} (in {provenance.where('ckpt_path')}) is not used by "
                f"{ns.command}: name the checkpoints in the predictor's own parameters "
                "(model.params.ckpt, hand_ckpt, outpaint_ckpt)"
            )
        model, datamodule, trainer, ckpt_path = build(cfg, provenance)
        if ns.command == "export":
            print(f"exported: {export(cfg, model, ckpt_path)}/")
            return {}
        resume_step = read_checkpoint(ckpt_path, mmap=True)["global_step"] if ckpt_path else 0
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if ns.command == "fit":
        if ckpt_path and 0 < trainer.max_steps <= resume_step:
            step = resume_step
            print(
                f"{ckpt_path} is at step {step}, which trainer.max_steps={trainer.max_steps} "
                f"already reaches: nothing to train. To continue, raise it, e.g. "
                f"trainer.max_steps={2 * step}"
            )
            return {}
        if trainer.logger is not None:
            params = flatten(OmegaConf.to_container(cfg, resolve=True))
            write_hparams_tab(trainer.logger, params, ckpt_path is not None)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    elif ns.command == "eval":
        trainer.test(model, datamodule=datamodule)
    elif ns.command == "predict":
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    else:
        trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        print("\n".join(output_locations(ns.command, model, trainer)))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def output_locations(command: str, model: L.LightningModule, trainer: L.Trainer) -> list[str]:
    """Where a finished command wrote what a user looks at next."""
    lines = []
    if command == "eval" and "results_dir" in model.hparams:
        out = Path(model.hparams.results_dir)
        lines.append(f"results: {out / 'results.md'} and {out / 'results.json'}")
    if command == "predict" and hasattr(model, "out_dir"):
        lines.append(f"images: {model.out_dir}/")
    callback = trainer.checkpoint_callback
    if command == "fit" and callback is not None and callback.dirpath:
        lines.append(f"checkpoints: {callback.dirpath}/ (last: {callback.dirpath}/last.ckpt)")
    # the logger's own folder: trainer.log_dir is a collective, and this runs on rank 0 only
    if trainer.logger is not None and trainer.logger.log_dir:
        lines.append(f"TensorBoard logs: {trainer.logger.log_dir}/ (make tensorboard)")
    return lines


if __name__ == "__main__":
    main()
