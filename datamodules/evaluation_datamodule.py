"""Generated and real images, with the poses and captions the generated ones were made from.

Generated images come as schema shards (their json holds the conditioning people and the
prompt) or as a folder of ``<key>.png``/``<key>.jpg`` files whose conditions are looked up by
key in the real shards. Every image is read exactly once across DDP ranks and workers, resized
to ``resolution`` x ``resolution`` with its keypoints scaled alike.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from datamodules.schema import BODY_KEYPOINTS, HAND_KEYPOINTS, Person, Sample
from datamodules.shards import (
    SkipCounter,
    check_shards,
    check_split,
    expand_shards,
    sample_pipeline,
    validated_samples,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def stable_id(key: str) -> int:
    """A 63-bit id of a sample key, the same on every rank and run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def _poses(people: list[Person], scale: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    bodies = [p.body * np.r_[scale, 1.0] for p in people]
    hands = [
        h * np.r_[scale, 1.0] for p in people for h in (p.left_hand, p.right_hand) if h is not None
    ]
    return (
        torch.tensor(np.array(bodies)).reshape(-1, BODY_KEYPOINTS, 3),
        torch.tensor(np.array(hands)).reshape(-1, HAND_KEYPOINTS, 3),
    )


def to_record(
    key: str, image: Image.Image, caption: str, people: list[Person], resolution: int
) -> dict:
    """``image`` ``[3, R, R]`` in [0, 1], ``body`` ``[P, 17, 3]``, ``hands`` ``[Q, 21, 3]``."""
    width, height = image.size
    scale = np.array([resolution / width, resolution / height])
    pixels = np.asarray(image.convert("RGB").resize((resolution, resolution), Image.BICUBIC))
    body, hands = _poses(people, scale)
    return {
        "key": key,
        "id": stable_id(key),
        "image": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255,
        "caption": caption,
        "body": body,
        "hands": hands,
    }


def collate_records(records: list[dict]) -> dict:
    """Images stacked; poses stay per-image lists (their counts differ)."""
    return {
        "key": [r["key"] for r in records],
        "id": torch.tensor([r["id"] for r in records]),
        "image": torch.stack([r["image"] for r in records]),
        "caption": [r["caption"] for r in records],
        "body": [r["body"] for r in records],
        "hands": [r["hands"] for r in records],
    }


class _ShardRecords:
    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, samples: Iterable[Sample], counter: SkipCounter) -> Iterator[dict]:
        for s in samples:
            yield to_record(s.key, s.image, s.caption, s.people, self.resolution)


class FolderRecords(IterableDataset):
    """Generated images in a folder, conditions from ``conditions`` (key -> sample metadata);
    files are split over ranks, then workers, in sorted order."""

    def __init__(
        self, files: list[str], conditions: dict[str, tuple[str, list[Person]]], resolution: int
    ):
        self.files = files
        self.conditions = conditions
        self.resolution = resolution

    def __iter__(self) -> Iterator[dict]:
        for path in wds.split_by_worker(wds.split_by_node(self.files)):
            key = Path(path).stem
            caption, people = self.conditions[key]
            with Image.open(path) as image:
                yield to_record(key, image, caption, people, self.resolution)


def read_conditions(urls: list[str]) -> dict[str, tuple[str, list[Person]]]:
    """Key -> (caption, people) of every valid sample in ``urls`` (images are not kept)."""
    raw = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    return {s.key: (s.caption, s.people) for s in validated_samples(raw, SkipCounter())}


class EvaluationDataModule(L.LightningDataModule):
    """``test_dataloader()`` returns ``[generated, real]`` loaders of :func:`collate_records`
    batches. ``generated`` is a shard pattern or a folder of images named by sample key."""

    def __init__(
        self,
        generated: str,
        real: str,
        resolution: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.real_urls = expand_shards(real)
        check_shards(self.real_urls)
        self.folder = os.path.isdir(generated)
        if self.folder:
            self.generated_files = sorted(
                str(p) for p in Path(generated).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not self.generated_files:
                raise FileNotFoundError(f"generated={generated!r}: no .png/.jpg images")
        else:
            self.generated_urls = expand_shards(generated)
            check_shards(self.generated_urls)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers

    def _shard_loader(self, urls: list[str], what: str) -> DataLoader:
        world = self.trainer.world_size if self.trainer else 1
        check_split(urls, world, self.num_workers, what)
        pipeline = sample_pipeline(
            urls, _ShardRecords(self.resolution), seed=0, shuffle=False, resampled=False
        )
        return self._loader(pipeline)

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_records,
        )

    def test_dataloader(self) -> list[DataLoader]:
        if self.folder:
            conditions = read_conditions(self.real_urls)
            missing = [f for f in self.generated_files if Path(f).stem not in conditions]
            if missing:
                raise KeyError(
                    f"{len(missing)} generated image(s) have no real sample with "
                    f"their key, e.g. {missing[0]!r}"
                )
            generated = self._loader(
                FolderRecords(self.generated_files, conditions, self.resolution)
            )
        else:
            generated = self._shard_loader(self.generated_urls, "generated")
        return [generated, self._shard_loader(self.real_urls, "real")]
