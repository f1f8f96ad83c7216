"""Poses and prompts to generate from: every sample of a shard set once, across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import lightning as L
from torch.utils.data import DataLoader

from datamodules.full_body_datamodule import letterbox
from datamodules.schema import Sample
from datamodules.shards import (
    SkipCounter,
    check_shards,
    check_split,
    expand_shards,
    sample_pipeline,
)


class _PoseRecords:
    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, samples: Iterable[Sample], counter: SkipCounter) -> Iterator[dict]:
        for sample in samples:
            _, _, people = letterbox(sample, self.resolution)
            yield {"key": sample.key, "people": people, "caption": sample.caption}


def collate_poses(records: list[dict]) -> dict:
    return {k: [r[k] for r in records] for k in ("key", "people", "caption")}


class PoseDataModule(L.LightningDataModule):
    """``predict_dataloader()``: batches of ``{"key", "people", "caption"}`` lists, the people
    letterboxed to ``resolution`` x ``resolution`` pixels (as the outpainter was trained)."""

    def __init__(
        self,
        shards: str | Sequence[str],
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
    ):
        super().__init__()
        self.urls = expand_shards(shards)
        check_shards(self.urls)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer else 1
        check_split(self.urls, world, self.num_workers, "shards")
        pipeline = sample_pipeline(
            self.urls, _PoseRecords(self.resolution), seed=0, shuffle=False, resampled=False
        )
        return DataLoader(
            pipeline,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_poses,
        )
