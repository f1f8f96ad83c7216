"""Poses and prompts to generate from: every sample of a shard set once, across DDP ranks."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.full_body_datamodule import letterbox
from datamodules.hand_crops import HandCropConfig
from datamodules.hand_datamodule import hand_examples
from datamodules.schema import Sample
from datamodules.shards import (
    SkipCounter,
    check_shards,
    check_split,
    expand_shards,
    sample_pipeline,
)

log = logging.getLogger(__name__)


def not_done(key: str, done_dir: Path | None) -> bool:
    """Whether ``<done_dir>/<key>.png`` is still to be written (always, without a folder). A
    file that is not a whole PNG (a run killed while writing it by other means than handdiff's
    own atomic writes) is removed, named in the log, and made again."""
    if done_dir is None:
        return True
    path = done_dir / f"{key}.png"
    if not path.is_file():
        return True
    try:
        with Image.open(path) as image:
            image.verify()  # reads every chunk and checks its CRC, without decoding pixels
        return False
    except Exception as exc:  # PIL raises many types for damaged files
        log.warning("%s is not a complete image (%s): removed, it will be made again", path, exc)
        path.unlink(missing_ok=True)
        return True


class PoseRecords:
    """Samples -> generation records: ``{"key", "people", "caption"}`` letterboxed to
    ``resolution``, or with ``hand_crops`` one ``{"key", "pose_image", "caption"}`` per visible
    hand; ``keys`` and ``done_dir`` leave samples out (a subset, work already done);
    ``with_image`` adds the letterboxed photo as ``image`` ``[R, R, 3]`` uint8 (HandRefiner
    repairing the real images); ``captions`` (key -> prompt) replaces the samples' captions
    (an evaluation's own prompt set)."""

    def __init__(
        self,
        resolution: int,
        keys: frozenset[str] | None,
        done_dir: Path | None,
        hand_crops: HandCropConfig | None,
        with_image: bool = False,
        captions: Mapping[str, str] | None = None,
    ):
        self.resolution = resolution
        self.keys = keys
        self.done_dir = done_dir
        self.hand_crops = hand_crops
        self.with_image = with_image
        self.captions = captions

    def __call__(self, samples: Iterable[Sample], counter: SkipCounter | None) -> Iterator[dict]:
        for sample in samples:
            if self.keys is not None and sample.key not in self.keys:
                continue
            if self.captions is not None and sample.key in self.captions:
                sample = replace(sample, caption=self.captions[sample.key])
            if self.hand_crops is None:
                if not_done(sample.key, self.done_dir):
                    pixels, _, people = letterbox(sample, self.resolution)
                    record = {"key": sample.key, "people": people, "caption": sample.caption}
                    yield {**record, "image": pixels} if self.with_image else record
                continue
            for crop in hand_examples(sample, False, random.Random(0), self.hand_crops):
                if isinstance(crop, dict) and not_done(crop["hand_key"], self.done_dir):
                    yield {"key": crop["hand_key"], "pose_image": crop["pose_image"],
                           "caption": crop["caption"]}  # fmt: skip


def collate_poses(records: list[dict]) -> dict:
    """Lists per field; tensors (hand skeletons) stacked."""
    batch = {}
    for field in records[0]:
        values = [r[field] for r in records]
        batch[field] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class PoseDataModule(L.LightningDataModule):
    """``predict_dataloader()``: batches of ``{"key", "people", "caption"}`` lists, the people
    letterboxed to ``resolution`` x ``resolution`` pixels (as the outpainter was trained); with
    ``hand_crops``, one ``{"key": "<key>_hand<n>", "pose_image" [3, r, r], "caption"}`` per
    visible hand, cut as the hand generator's training crops (no flips).

    ``keys`` restricts it to those samples (an evaluation subset); with ``skip_done`` a sample
    whose ``<skip_done>/<key>.png`` exists is left out, so an interrupted generation resumes.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        keys: Sequence[str] | None = None,
        skip_done: str | None = None,
        hand_crops: HandCropConfig | dict | None = None,
        with_image: bool = False,
        captions: Mapping[str, str] | None = None,
    ):
        super().__init__()
        self.with_image = with_image
        self.captions = captions
        self.urls = expand_shards(shards)
        check_shards(self.urls)
        self.keys = frozenset(keys) if keys is not None else None
        self.skip_done = Path(skip_done) if skip_done else None
        if hand_crops is not None and not isinstance(hand_crops, HandCropConfig):
            hand_crops = HandCropConfig(**hand_crops)
        self.hand_crops = hand_crops
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer else 1
        check_split(self.urls, world, self.num_workers, "shards")
        pipeline = sample_pipeline(
            self.urls,
            PoseRecords(
                self.resolution,
                self.keys,
                self.skip_done,
                self.hand_crops,
                self.with_image,
                self.captions,
            ),
            seed=0,
            shuffle=False,
            resampled=False,
        )
        return DataLoader(
            pipeline,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_poses,
        )
