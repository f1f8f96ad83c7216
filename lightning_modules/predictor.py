"""What every generating method shares under ``trainer.predict``: per-key seeds, resumable image
files, timing records, and the data and scoring settings the evaluation harness asks for."""

from __future__ import annotations

import abc
import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torchvision.utils import save_image

from datamodules.evaluation_datamodule import stable_id
from datamodules.hand_crops import HandCropConfig
from datamodules.pose_datamodule import PoseDataModule, PoseRecords, collate_poses
from datamodules.schema import Sample
from metrics.inference_timer import InferenceTimer, SynchronizedClock

# (experiment config path, checkpoint or "last" or None) -> (module, merged config)
ExperimentLoader = Callable[[str, str | None], tuple[L.LightningModule, dict]]


def seeds_for(keys: list[str], seed: int) -> list[int]:
    """One seed per sample, from its key: the same on every rank, batch and run."""
    return [(seed + stable_id(k)) % 2**31 for k in keys]


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused (ValueError) when it resolves outside ``folder``: names come
    from sample keys, which come from user files."""
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"output {name!r} would be written outside {folder}")
    return path


def save_png(image: torch.Tensor, path: Path) -> None:
    """``image`` ``[3, H, W]`` in [0, 1] to ``path``, written whole or not at all (a killed run
    leaves no truncated file for a resumed one to trust)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(image, tmp, format="png")
    os.replace(tmp, path)


class GenerationPredictor(L.LightningModule, abc.ABC):
    """Base of the predictors: writes ``<out_dir>/<key>.png`` and, per batch, the seconds and
    number of images to ``<out_dir>/timing-rank<r>.jsonl`` (appended, so resumed runs keep the
    record; the first batch of each run is marked ``warmup``).

    ``timing_runs > 0`` adds HumanSD's inference-time protocol: after generating, the first
    pose is sampled alone (batch 1) once to warm up and then ``timing_runs`` times, and the
    mean is written to ``<out_dir>/timing-batch1-rank<r>.json``.

    Subclasses set ``self.resolution`` (the square they generate at) and implement
    :meth:`sample_batch` (the timed sampling call) and :meth:`write_outputs`.
    """

    def __init__(self, out_dir: str, seed: int, load_experiment: ExperimentLoader | None = None):
        super().__init__()
        self._load_experiment = load_experiment
        self.out_dir = Path(out_dir)
        self.seed = seed
        self.resolution = 512
        # keyword arguments of EvaluationDataModule and of the Evaluator to score this method
        self.scoring_data: dict = {"fit": "letterbox"}
        self.scoring_metrics: dict = {}
        # choices a results table must show beside the method's name (e.g. the mask source)
        self.settings: dict[str, str] = {}
        self.timing_runs = 0
        # the hand generator predicts on hand crops (HandPredictor sets its crop settings)
        self.hand_crops: HandCropConfig | None = None
        # key -> prompt replacing the samples' captions (an evaluation's own prompt set)
        self.captions: dict[str, str] | None = None
        self._timed_batches = 0
        self._first_pose: dict | None = None

    def load(self, config: str, ckpt: str | None) -> tuple[L.LightningModule, dict]:
        """A trained method and its experiment config, through the loader the experiments
        layer hands in (``experiments.run.load_module``: configs, checkpoints, EMA)."""
        if self._load_experiment is None:
            raise ValueError(
                f"{type(self).__name__} loads experiments through load_experiment, which the "
                "experiments layer passes (build it with experiments.run.make)"
            )
        return self._load_experiment(config, ckpt)

    @abc.abstractmethod
    def sample_batch(self, batch: dict):
        """Generate for one batch of poses (what is timed); returns what
        :meth:`write_outputs` writes."""

    @abc.abstractmethod
    def write_outputs(self, batch: dict, outputs) -> None:
        """Write the generated images of ``batch`` (the image file last: it marks the key
        done for a resumed run)."""

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        """Sample and write one batch; returns the keys written (Lightning keeps nothing with
        ``return_predictions=False``)."""
        if self._first_pose is None:
            self._first_pose = {k: v[:1] for k, v in batch.items()}
        with self.timed(len(batch["key"])):
            outputs = self.sample_batch(batch)
        self.write_outputs(batch, outputs)
        return list(batch["key"])

    def on_predict_end(self) -> None:
        if self.timing_runs > 0 and self._first_pose is not None:
            self.time_batch1(self._first_pose, self.timing_runs)

    def time_batch1(self, pose: dict, runs: int) -> dict:
        """HumanSD's protocol: seconds of ``runs`` batch-1 sampling calls after one warm-up."""
        self.sample_batch(pose)
        seconds = []
        for _ in range(runs):
            with SynchronizedClock() as clock:
                self.sample_batch(pose)
            seconds.append(clock.seconds)
        record = {"seconds": seconds, "mean": sum(seconds) / runs, "device": str(self.device)}
        file = self.out_dir / f"timing-batch1-rank{self.global_rank}.json"
        file.write_text(json.dumps(record))
        return record

    def prediction_datamodule(
        self, shards: str | Sequence[str], keys: Sequence[str] | None, batch_size: int,
        num_workers: int = 0,
    ) -> L.LightningDataModule:  # fmt: skip
        """The poses to generate from, leaving out those already written."""
        return PoseDataModule(
            shards, self.resolution, batch_size, num_workers, keys, str(self.out_dir),
            self.hand_crops, captions=self.captions,
        )  # fmt: skip

    def batch_for(self, sample: Sample) -> dict | None:
        """The batch :meth:`prediction_datamodule` would make of one sample (a pose given
        directly rather than in shards); None when it yields nothing (e.g. no hand to crop)."""
        records = list(PoseRecords(self.resolution, None, None, self.hand_crops)([sample], None))
        return collate_poses(records) if records else None

    def on_predict_start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._timed_batches = 0

    @contextlib.contextmanager
    def timed(self, num_images: int):
        """Time one sampling call (CUDA-synchronised) and append it to the timing file."""
        with SynchronizedClock() as clock:
            yield
        record = {
            "seconds": clock.seconds,
            "images": num_images,
            "warmup": self._timed_batches == 0,
            "device": str(self.device),
        }
        self._timed_batches += 1
        with (self.out_dir / f"timing-rank{self.global_rank}.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")

    def summary(self) -> dict[str, float]:
        """Values for the results table read from what every rank wrote (timings here;
        subclasses add their own)."""
        out = read_timings(self.out_dir)
        batch1 = [
            json.loads(f.read_text())["mean"]
            for f in sorted(self.out_dir.glob("timing-batch1-rank*.json"))
        ]
        if batch1:
            out["seconds_per_image_batch1"] = sum(batch1) / len(batch1)
        return out

    def generators(self, keys: list[str]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds_for(keys, self.seed)]

    def write(self, key: str, image: torch.Tensor) -> None:
        save_png(image, inside(self.out_dir, f"{key}.png"))


def read_reports(folder: str | os.PathLike) -> list[dict]:
    """The JSON lines every rank appended to ``<folder>/report-rank<r>.jsonl``, in order."""
    return [
        json.loads(line)
        for file in sorted(Path(folder).glob("report-rank*.jsonl"))
        for line in file.read_text().splitlines()
        if line.strip()
    ]


def read_timings(folder: str | os.PathLike) -> dict[str, float]:
    """Median and 90th percentile seconds per image over the non-warm-up batches of every rank
    (all batches when each run had only one), and the number of images timed."""
    records = [
        json.loads(line)
        for file in sorted(Path(folder).glob("timing-rank*.jsonl"))
        for line in file.read_text().splitlines()
        if line.strip()
    ]
    if not records:
        return {}
    kept = [r for r in records if not r["warmup"]] or records
    # the files already hold every rank's batches: no sync
    timer = InferenceTimer(warmup=0, sync_on_compute=False)
    for record in kept:
        timer.update(record["seconds"], record["images"])
    stats = timer.compute()
    return {
        "seconds_per_image": float(stats["median"]),
        "seconds_per_image_p90": float(stats["p90"]),
        "images_timed": sum(r["images"] for r in kept),
    }
