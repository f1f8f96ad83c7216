"""The evaluation harness: every method of a config on the same poses, prompts and seeds.

    .venv/bin/python -m experiments.evaluate experiments/eval/tiny.yaml [key=value ...]
    make eval [CONFIG=experiments/eval/<name>.yaml]     make ablations

For an evaluation config (see ``experiments/eval/tiny.yaml``):

1. methods whose checkpoint is ``last`` and missing are trained first, with their own config
   plus ``train_overrides`` (in the launching process only; a multi-process launch by torchrun
   or SLURM must find them trained);
2. a fixed subset of the evaluation set is chosen (``eval_set.subset`` keys, smallest seeded
   hash; saved as ``results/<name>/subset.json``);
3. each method generates with ``trainer.predict``: every rank a disjoint part of the subset,
   images written to ``results/<name>/<method>/images/<key>.png``; a rerun skips the images
   that exist, so an interrupted evaluation resumes;
4. each method is scored by the ``metrics`` Evaluator (only metric states cross ranks) and
   logged to its own TensorBoard run ``logs/<name>/<method>`` with scalars and ``hparams``;
5. rank 0 writes ``results/<name>/results.{json,md,csv}`` (methods x metrics) and a
   side-by-side grid (skeleton | real | each method) to ``comparison.png`` and TensorBoard.

Several GPUs: ``trainer.devices=N trainer.strategy=ddp``; torchrun or SLURM: see the README.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

from datamodules.evaluation_datamodule import (
    EvaluationDataModule,
    read_resized,
    select_subset,
    stable_id,
)
from datamodules.full_body_datamodule import FullBodyConfig, letterbox
from datamodules.rendering import render_full_skeleton
from datamodules.shards import SkipCounter, expand_shards, validated_samples
from experiments.checkpoints import find_last_checkpoint
from experiments.config import EVALUATION, ConfigError, flatten, import_target, instantiate
from experiments.config import load_config as _load_config
from experiments.notices import configure_logging
from experiments.run import limit_threads, make
from experiments.run import main as run_main
from metrics.evaluation import COLUMNS, markdown_table

log = logging.getLogger("experiments.evaluate")


@dataclasses.dataclass
class EvalSet:
    """The evaluation set: schema shards with the poses, prompts and real images."""

    shards: str | list[str]
    real: str | list[str] | None = None  # FID/KID reference; None: the subset's own images
    subset: int | None = None  # number of samples (None: all), chosen by seeded key hash
    subset_seed: int = 0
    resolution: int = 512  # square, letterboxed, every method's images are scored at
    batch_size: int = 8
    num_workers: int = 0
    grid_size: int = 4  # poses in the side-by-side comparison grid
    # a method whose settings or checkpoints changed since its images were made: False refuses
    # to mix old and new images, True deletes the old ones and generates again
    regenerate_changed: bool = False
    # HumanSD's inference-time protocol: the first pose alone (batch 1), mean of this many
    # runs after a warm-up (seconds_per_image_batch1); 0 = off
    timing_runs: int = 0
    # a text file of prompts (one per line) replacing the samples' captions, one per key by a
    # stable hash: an evaluation's own prompt set (e.g. prompts without hands)
    prompts: str | None = None
    # a method of this config whose images are the FID/KID reference instead of the real
    # images (the base model, for a forgetting check); it must come before the others
    real_method: str | None = None


def prompt_set(eval_set: EvalSet, keys: list[str]) -> dict[str, str] | None:
    """Key -> prompt from ``eval_set.prompts`` (None without one)."""
    if eval_set.prompts is None:
        return None
    path = Path(eval_set.prompts)
    if not path.is_file():
        raise ConfigError(f"eval_set.prompts={eval_set.prompts!r}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"eval_set.prompts={eval_set.prompts!r}: no prompt in it")
    return {key: prompts[stable_id(key) % len(prompts)] for key in keys}


def load_config(files: list[str], overrides: list[str] = ()):
    cfg, provenance = _load_config(files, overrides, schema=EVALUATION)
    container = OmegaConf.to_container(cfg, resolve=True)
    for method, node in (container["methods"] or {}).items():
        for key in ("out_dir", "seed"):
            if key in (node or {}).get("params", {}):
                where = provenance.where(f"methods.{method}.params.{key}")
                raise ConfigError(
                    f"methods.{method}.params.{key} (in {where}) is set by the harness: "
                    f"images go to results/<name>/{method}/images, the seed is the top-level one"
                )
    return container


def loaded_models(node: dict) -> list[tuple[str, str, str | None]]:
    """``(config, ckpt parameter, ckpt)`` of each experiment a method's predictor loads:
    ``config``/``ckpt``, ``hand_config``/``hand_ckpt``, ... (ckpt defaults from the target)."""
    params = node.get("params") or {}
    defaults = {
        name: p.default
        for name, p in inspect.signature(import_target(node["target"])).parameters.items()
    }
    models = []
    for key, config in params.items():
        if key.endswith("config") and isinstance(config, str):
            ckpt_key = key.removesuffix("config") + "ckpt"
            models.append((config, ckpt_key, params.get(ckpt_key, defaults.get(ckpt_key))))
    return models


def last_checkpoint_of(config: str, overrides: Sequence[str] = ()) -> Path | None:
    """The checkpoint ``ckpt: last`` means for an experiment config (and overrides) now."""
    return find_last_checkpoint(OmegaConf.to_container(_load_config([config], overrides)[0]))


def required_training(node: dict) -> list[str]:
    """The experiment configs a method loads with ``ckpt: last``: those must be trained."""
    return [config for config, _, ckpt in loaded_models(node) if ckpt == "last"]


def ensure_trained(methods: dict[str, dict], train_overrides: Sequence[str]) -> None:
    """Train (in this process) every required config that has no checkpoint yet."""
    pending = []
    for node in methods.values():
        for config in required_training(node):
            if last_checkpoint_of(config, train_overrides) is None and config not in pending:
                pending.append(config)
    if not pending:
        return
    if "WORLD_SIZE" in os.environ or rank_zero_only.rank != 0:
        raise ConfigError(
            f"no checkpoint for {pending}: train them before a multi-process launch "
            f"(.venv/bin/python -m experiments.run fit CONFIG, or one single-process `make eval` "
            "run)"
        )
    for config in pending:
        log.info("training %s (no checkpoint yet)", config)
        run_main(["fit", config, *train_overrides])


def checkpoint_files(node: dict, overrides: Sequence[str] = ()) -> dict[str, str]:
    """The checkpoint files a method's predictor loads (``*_ckpt`` beside each ``*_config``;
    ``last`` resolved to the file it means now), by parameter name."""
    files = {}
    for config, ckpt_key, ckpt in loaded_models(node):
        if ckpt == "last":
            ckpt = last_checkpoint_of(config, overrides)
        if ckpt:
            files[ckpt_key] = str(ckpt)
    return files


def file_digest(path: str | os.PathLike, chunk: int = 4 << 20) -> str:
    """A quick content digest: size, first and last 4 MiB. A torch checkpoint is a zip whose
    directory, at the end, holds a CRC of every member, so any change of weights changes it."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as file:
        digest.update(file.read(chunk))
        file.seek(max(0, size - chunk))
        digest.update(file.read(chunk))
    return digest.hexdigest()


def check_generation(
    method: str,
    node: dict,
    images: Path,
    overrides: Sequence[str],
    regenerate: bool,
    seed: int = 0,
) -> dict[str, dict]:
    """Keep ``images/generation.json``: the method's settings, the sampling seed and the
    digests of its checkpoints. Images made with other ones, or with no record at all, are
    refused (or, with ``regenerate``, deleted) instead of being scored under new settings.
    Prints and returns the checkpoints (path, digest) the method loads."""
    files = checkpoint_files(node, overrides)  # resolves "last": once
    for key, path in files.items():
        if not Path(path).is_file():
            raise ConfigError(f"methods.{method}.params.{key}={path!r}: no such checkpoint file")
    record = {
        "method": node,
        "seed": seed,
        "checkpoints": {
            key: {"path": path, "digest": file_digest(path)} for key, path in files.items()
        },
    }
    if rank_zero_only.rank == 0:
        for key, found in record["checkpoints"].items():
            saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(found["path"])))
            print(
                f"{method}: {key} = {found['path']} (saved {saved}, digest "
                f"{found['digest'][:12]}; pin with methods.{method}.params.{key}=PATH)"
            )
    file = images / "generation.json"
    if not file.is_file() and any(images.glob("*.png")):
        saved = {"images": "made before generation records were kept"}
    else:
        saved = json.loads(file.read_text()) if file.is_file() else None
    if saved is not None:
        now = json.loads(json.dumps(record))
        if saved != now:
            before, after = flatten(saved), flatten(now)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            if not regenerate or "WORLD_SIZE" in os.environ:
                raise ConfigError(
                    f"methods.{method}: its images in {images} were made with other settings or "
                    f"checkpoints ({', '.join(changed)} changed); set "
                    "eval_set.regenerate_changed=true (in a single-process run) to make them "
                    "again, or use another evaluation name"
                )
            log.warning("%s: %s changed, generating its images again", method, changed)
            shutil.rmtree(images)
    if rank_zero_only.rank == 0:
        images.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, file)  # whole for ranks that read it at the same time
    return record["checkpoints"]


def subset_keys(eval_set: EvalSet, out: Path) -> list[str]:
    """The evaluation subset, chosen once and kept in ``out/subset.json``; a later run with
    other subset settings is refused rather than mixing images of two subsets."""
    file = out / "subset.json"
    settings = {"shards": eval_set.shards, "subset": eval_set.subset, "seed": eval_set.subset_seed}
    if file.is_file():
        saved = json.loads(file.read_text())
        if saved["settings"] != settings:
            raise ConfigError(
                f"{file} was chosen with {saved['settings']}, not {settings}: use another "
                "evaluation name or delete the results folder"
            )
        return saved["keys"]
    keys = select_subset(expand_shards(eval_set.shards), eval_set.subset, eval_set.subset_seed)
    if not keys:
        raise ConfigError(f"eval_set.shards={eval_set.shards!r}: no valid sample")
    out.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"settings": settings, "keys": keys}, indent=1))
    os.replace(tmp, file)  # ranks started together write the same content
    return keys


def evaluate_method(
    method: str,
    node: dict,
    container: dict,
    eval_set: EvalSet,
    keys: list[str],
    out: Path,
    captions: dict[str, str] | None = None,
) -> tuple[dict[str, float], bool, dict[str, str], dict[str, dict]]:
    """Generate the subset with one method (resumable), then score it; returns its row,
    whether it generates whole images (not hand crops), the predictor's settings that the
    table must show (e.g. where the two-stage hand masks came from) and its checkpoints."""
    images = out / method / "images"
    overrides = container.get("train_overrides") or []
    seed = container.get("seed", 0)
    base = (node.get("params") or {}).get("base_method")
    extra, recorded = {}, node
    if base:
        # a post-step (HandRefiner) works on the base method's images: its record holds the
        # base's, so new base images make its own images stale too
        extra["base_images"] = str(out / base / "images")
        base_record = json.loads((out / base / "images" / "generation.json").read_text())
        recorded = {**node, "base_generation": base_record}
    if captions is not None:  # other prompts, other images
        digest = hashlib.sha256(json.dumps(captions, sort_keys=True).encode()).hexdigest()
        recorded = {**recorded, "prompt_set": digest}
    checkpoints = check_generation(
        method, recorded, images, overrides, eval_set.regenerate_changed, seed
    )
    predictor = make(node, out_dir=str(images), seed=container.get("seed", 0), **extra)
    predictor.timing_runs = eval_set.timing_runs
    predictor.captions = captions
    trainer = L.Trainer(**container["trainer"], logger=False, enable_checkpointing=False)
    data = predictor.prediction_datamodule(
        eval_set.shards, keys, eval_set.batch_size, eval_set.num_workers
    )
    trainer.predict(predictor, datamodule=data, return_predictions=False)
    # every rank's images are on disk before any rank lists the folder
    trainer.strategy.barrier("generated")
    scoring_data, scoring_metrics = predictor.scoring_data, predictor.scoring_metrics
    summary, settings = predictor.summary(), predictor.settings
    del predictor, trainer
    metrics = container["metrics"]
    params = {**(metrics.get("params") or {}), **scoring_metrics}
    params.update(results_dir=str(out / method), method=method)
    evaluator = instantiate({"target": metrics["target"], "params": params})
    if eval_set.real_method:
        real = str(out / eval_set.real_method / "images")
    else:
        real = eval_set.real or eval_set.shards
    datamodule = EvaluationDataModule(
        generated=str(images),
        real=real,
        resolution=eval_set.resolution,
        batch_size=eval_set.batch_size,
        num_workers=eval_set.num_workers,
        keys=None if eval_set.real else keys,
        conditions=eval_set.shards,
        captions=captions,
        **scoring_data,
    )
    logger = _logger(container, method)
    trainer = L.Trainer(**container["trainer"], logger=logger, enable_checkpointing=False)
    trainer.test(evaluator, datamodule=datamodule)
    row = {**evaluator.results, **summary}
    if logger:
        table_keys = {c[0] for c in COLUMNS}
        logger.log_hyperparams(
            flatten({"method": method, **node}),
            {f"hparams/{k}": v for k, v in row.items() if k in table_keys},
        )
    return row, "hand_crops" not in scoring_data, settings, checkpoints


def _logger(container: dict, version: str) -> TensorBoardLogger | None:
    node = container.get("logger")
    if not node:
        return None
    params = {**(node.get("params") or {}), "name": container["name"], "version": version}
    return instantiate({"target": node["target"], "params": params})


def comparison_grid(
    eval_set: EvalSet, keys: list[str], out: Path, methods: list[str]
) -> torch.Tensor | None:
    """Rows: the first ``grid_size`` subset poses; columns: skeleton | real | each method."""
    wanted = keys[: eval_set.grid_size]
    raw = wds.DataPipeline(
        wds.SimpleShardList(expand_shards(eval_set.shards)), wds.tarfile_to_samples()
    )
    samples = {s.key: s for s in validated_samples(raw, SkipCounter()) if s.key in wanted}
    res, body = eval_set.resolution, FullBodyConfig(resolution=eval_set.resolution)
    tiles = []
    for key in wanted:
        pixels, _, people = letterbox(samples[key], res)
        skeleton = render_full_skeleton(
            people, (res, res), body.body_line_width, body.hand_line_width
        )
        row = [skeleton, pixels]
        for method in methods:
            path = out / method / "images" / f"{key}.png"
            image = read_resized(path, res) if path.is_file() else pixels * 0
            row.append(image)
        tiles += [torch.from_numpy(t.copy()).permute(2, 0, 1).float() / 255 for t in row]
    if not tiles:
        return None
    grid = make_grid(tiles, nrow=2 + len(methods), padding=2, pad_value=1.0)
    return with_column_labels(grid, ["skeleton", "real", *methods], res, padding=2)


def with_column_labels(
    grid: torch.Tensor, labels: list[str], tile: int, padding: int, height: int = 16
) -> torch.Tensor:
    """``grid`` ``[3, H, W]`` with a white strip on top naming each column (black text at
    each column's left edge, cut to the column's width)."""
    strip = Image.new("RGB", (grid.shape[-1], height), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for n, label in enumerate(labels):
        while label and draw.textlength(label, font=font) > tile:
            label = label[:-1]
        draw.text((padding + n * (tile + padding) + 2, 2), label, fill="black", font=font)
    header = torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255
    return torch.cat([header, grid], 1)


def write_tables(
    name: str, rows: dict[str, dict], out: Path, extra: dict, settings: dict[str, dict]
) -> None:
    """``results.json`` (every value and setting), ``results.md`` (the paper table, with each
    method's settings listed under it) and ``results.csv`` (raw values, one row per method)."""
    record = {"name": name, **extra, "methods": rows, "method_settings": settings}
    (out / "results.json").write_text(json.dumps(record, indent=2))
    notes = "".join(
        f"- {method}: " + ", ".join(f"{k}={v}" for k, v in values.items()) + "\n"
        for method, values in settings.items()
        if values
    )
    table = f"## {name}\n\n" + markdown_table(rows) + (f"\n{notes}" if notes else "")
    (out / "results.md").write_text(table)
    columns = [c[0] for c in COLUMNS if any(c[0] in r for r in rows.values())]
    columns += ["n_generated", "n_real"]
    with (out / "results.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["method", *columns])
        for method, row in rows.items():
            writer.writerow([method, *(row.get(c, "") for c in columns)])


def check_base_methods(methods: dict[str, dict]) -> None:
    """A method with ``params.base_method`` (a post-step such as HandRefiner) needs that method
    evaluated before it in the same config."""
    earlier: list[str] = []
    for method, node in methods.items():
        params = node.get("params") or {}
        base = params.get("base_method")
        if base is not None and base not in earlier:
            raise ConfigError(
                f"methods.{method}.params.base_method={base!r}: no such method before it "
                f"(earlier methods: {', '.join(earlier) or 'none'})"
            )
        if base is not None and "base_images" in params:
            raise ConfigError(f"methods.{method}.params: set base_method or base_images, not both")
        earlier.append(method)


def evaluate(container: dict) -> dict[str, dict]:
    """Run a loaded evaluation config; returns method -> results (on every rank)."""
    name = container["name"]
    eval_set = EvalSet(**container["eval_set"])
    methods = {m: node for m, node in container["methods"].items() if node is not None}
    check_base_methods(methods)
    if eval_set.real_method is not None:
        if eval_set.real_method != next(iter(methods), None):
            raise ConfigError(
                f"eval_set.real_method={eval_set.real_method!r}: must be the first method "
                f"(the methods are {', '.join(methods)})"
            )
        if eval_set.real is not None:
            raise ConfigError("eval_set: set real or real_method, not both")
    out = Path("results") / name
    L.seed_everything(container.get("seed", 0), workers=True)
    ensure_trained(methods, container.get("train_overrides") or [])
    keys = subset_keys(eval_set, out)
    captions = prompt_set(eval_set, keys)
    rows, whole_images, settings, checkpoints = {}, [], {}, {}
    for method, node in methods.items():
        log.info("evaluating %s on %d poses", method, len(keys))
        rows[method], whole, settings[method], checkpoints[method] = evaluate_method(
            method, node, container, eval_set, keys, out, captions
        )
        if whole:
            whole_images.append(method)
    if rank_zero_only.rank == 0:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        extra = {"eval_set": dataclasses.asdict(eval_set), "subset_size": len(keys),
                 "seed": container.get("seed", 0), "world_size": world,
                 "methods_config": methods, "checkpoints": checkpoints}  # fmt: skip
        write_tables(name, rows, out, extra, settings)
        grid = comparison_grid(eval_set, keys, out, whole_images)
        if grid is not None:
            save_image(grid, out / "comparison.png")
            logger = _logger(container, "comparison")
            if logger:
                columns = " | ".join(["skeleton", "real", *whole_images])
                logger.experiment.add_image(f"comparison/{columns}", grid, 0)
                logger.finalize("success")
        print((out / "results.md").read_text())
        print(f"results: {out}/ (results.md, results.csv, results.json, comparison.png, "
              "<method>/images/)")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = sys.argv[1:] if argv is None else argv
    configure_logging()
    limit_threads()
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if not files:
        raise SystemExit(
            "usage: .venv/bin/python -m experiments.evaluate CONFIG.yaml [key=value ...]"
        )
    try:
        container = load_config(files, overrides)
        return evaluate(container)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
