"""Generated and real images, with the poses and captions the generated ones were made from.

Generated images come as schema shards (their json holds the conditioning people and the
prompt) or as a folder of ``<key>.png``/``<key>.jpg`` files whose conditions are looked up by
key in the real shards. Every image is read exactly once across DDP ranks and workers and
brought to ``resolution`` x ``resolution``: stretched (``fit="stretch"``, generated images of
the real image's aspect) or letterboxed (``fit="letterbox"``: what the pose-conditioned methods
generate from), keypoints transformed alike. With ``hand_crops`` the unit is a hand: each real
sample gives one square crop per visible hand (the hand generator's training crops, without
flips), keyed ``<key>_hand<n>``, and generated crops are looked up by that key.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from datamodules.full_body_datamodule import letterbox
from datamodules.hand_crops import HandCropConfig
from datamodules.hand_datamodule import hand_examples
from datamodules.schema import BODY_KEYPOINTS, HAND_KEYPOINTS, Person, Sample, person_area
from datamodules.shards import (
    SkipCounter,
    check_shards,
    check_split,
    expand_shards,
    sample_pipeline,
    validated_samples,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
Fit = Literal["stretch", "letterbox"]
# key -> (caption, body [P, 17, 3], hands [Q, 21, 3], their persons' areas [Q], category), in
# the pixels of the resized image
Conditions = dict[str, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, str]]


def stable_id(key: str) -> int:
    """A 63-bit id of a sample key, the same on every rank and run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def select_subset(urls: Sequence[str], size: int | None, seed: int = 0) -> list[str]:
    """The keys of a fixed evaluation subset: the ``size`` valid samples of ``urls`` with the
    smallest seeded hash of their key (all of them when ``size`` is None), in that order.

    The choice depends only on the keys, not on shard order or the number of processes, and
    a sample stays selected when the set grows unless a new one hashes below it.
    """
    raw = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())
    keys = [s.key for s in validated_samples(raw, SkipCounter())]
    keys.sort(key=lambda k: (stable_id(f"{seed}/{k}"), k))
    return keys if size is None else keys[:size]


def _poses(
    people: list[Person], scale: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bodies ``[P, 17, 3]``, hands ``[Q, 21, 3]`` and each hand's person area ``[Q]``, scaled."""
    factor = np.r_[scale, 1.0]
    scaled = [
        Person(p.bbox, p.body * factor,
               *(None if h is None else h * factor for h in (p.left_hand, p.right_hand)))
        for p in people
    ]  # fmt: skip
    hands = [(h, person_area(p)) for p in scaled for h in (p.left_hand, p.right_hand)]
    hands = [(h, area) for h, area in hands if h is not None]
    return (
        torch.tensor(np.array([p.body for p in scaled])).reshape(-1, BODY_KEYPOINTS, 3),
        torch.tensor(np.array([h for h, _ in hands])).reshape(-1, HAND_KEYPOINTS, 3),
        torch.tensor([area for _, area in hands], dtype=torch.float64),
    )


def to_record(
    key: str,
    pixels: np.ndarray,
    caption: str,
    body: torch.Tensor,
    hands: torch.Tensor,
    hand_areas: torch.Tensor,
    category: str = "",
) -> dict:
    """``image`` ``[3, R, R]`` in [0, 1] from ``pixels`` ``[R, R, 3]`` uint8, ``body``
    ``[P, 17, 3]``, ``hands`` ``[Q, 21, 3]`` (already in those pixels) with their persons'
    areas ``[Q]`` (0: unknown, the hand's own box is used), and the sample's
    ``source.category`` (e.g. a Human-Art scene; "" when it has none)."""
    return {
        "key": key,
        "id": stable_id(key),
        "image": torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255,
        "caption": caption,
        "body": body,
        "hands": hands,
        "hand_areas": hand_areas,
        "category": category,
    }


def read_resized(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """An image file as RGB ``[R, R, 3]`` uint8, resized (bicubic) to ``resolution``; a file
    that cannot be read is named in the error."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((resolution,) * 2, Image.BICUBIC))
    except (OSError, ValueError, SyntaxError) as exc:
        raise OSError(f"cannot read image {str(path)!r}: {exc}") from None


def units(
    sample: Sample, resolution: int, fit: Fit, hand_crops: HandCropConfig | None
) -> Iterator[tuple]:
    """The evaluation units of a real sample: ``(key, pixels [R, R, 3], caption, body, hands,
    hands' person areas, category)`` with keypoints and areas in those pixels: the whole image,
    or one crop per visible hand."""
    category = str(sample.source.get("category") or "")
    if hand_crops is not None:
        crops = hand_examples(sample, False, random.Random(0), replace(hand_crops, flip_prob=0.0))
        for crop in (c for c in crops if isinstance(c, dict)):  # too small hands are left out
            pixels = ((crop["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
            hands = crop["keypoints"].double() * torch.tensor(
                [resolution / pixels.shape[0]] * 2 + [1]
            )
            pixels = Image.fromarray(pixels.byte().numpy()).resize((resolution,) * 2, Image.BICUBIC)
            yield (crop["hand_key"], np.asarray(pixels), crop["caption"],
                   torch.zeros(0, BODY_KEYPOINTS, 3, dtype=torch.float64), hands[None],
                   torch.tensor([crop["person_area"] * (resolution / crop["image"].shape[-1]) ** 2],
                                dtype=torch.float64),
                   category)  # fmt: skip
        return
    if fit == "letterbox":
        pixels, _, people = letterbox(sample, resolution)
        yield (sample.key, pixels, sample.caption, *_poses(people, np.ones(2)), category)
        return
    width, height = sample.image.size
    pixels = np.asarray(sample.image.convert("RGB").resize((resolution,) * 2, Image.BICUBIC))
    scale = np.array([resolution / width, resolution / height])
    yield (sample.key, pixels, sample.caption, *_poses(sample.people, scale), category)


def collate_records(records: list[dict]) -> dict:
    """Images stacked; poses stay per-image lists (their counts differ)."""
    return {
        "key": [r["key"] for r in records],
        "id": torch.tensor([r["id"] for r in records]),
        "image": torch.stack([r["image"] for r in records]),
        "caption": [r["caption"] for r in records],
        "body": [r["body"] for r in records],
        "hands": [r["hands"] for r in records],
        "hand_areas": [r["hand_areas"] for r in records],
        "category": [r["category"] for r in records],
    }


def with_caption(sample: Sample, captions: Mapping[str, str] | None) -> Sample:
    """``sample`` with its caption replaced by ``captions[key]`` when given."""
    if captions is None or sample.key not in captions:
        return sample
    return replace(sample, caption=captions[sample.key])


class _ShardRecords:
    def __init__(
        self,
        resolution: int,
        fit: Fit,
        keys: frozenset[str] | None,
        hand_crops: HandCropConfig | None,
        captions: Mapping[str, str] | None = None,
    ):
        self.resolution = resolution
        self.fit = fit
        self.keys = keys
        self.hand_crops = hand_crops
        self.captions = captions

    def __call__(self, samples: Iterable[Sample], counter: SkipCounter) -> Iterator[dict]:
        for s in samples:
            if self.keys is None or s.key in self.keys:
                s = with_caption(s, self.captions)
                for unit in units(s, self.resolution, self.fit, self.hand_crops):
                    yield to_record(*unit)


class FolderRecords(IterableDataset):
    """Generated images in a folder, conditions from ``conditions`` (key -> caption, body,
    hands at ``resolution``); files are split over ranks, then workers, in sorted order."""

    def __init__(self, files: list[str], conditions: Conditions, resolution: int):
        self.files = files
        self.conditions = conditions
        self.resolution = resolution

    def __iter__(self) -> Iterator[dict]:
        for path in wds.split_by_worker(wds.split_by_node(self.files)):
            key = Path(path).stem
            yield to_record(key, read_resized(path, self.resolution), *self.conditions[key])


def read_conditions(
    urls: list[str],
    resolution: int,
    fit: Fit = "stretch",
    keys: frozenset[str] | None = None,
    hand_crops: HandCropConfig | None = None,
    captions: Mapping[str, str] | None = None,
) -> Conditions:
    """Key -> (caption, body, hands, hand areas, category) of every evaluation unit of the
    valid samples in ``urls`` (pixels are not kept)."""
    raw = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    return {
        key: conditions
        for s in validated_samples(raw, SkipCounter())
        if keys is None or s.key in keys
        for key, _, *conditions in units(with_caption(s, captions), resolution, fit, hand_crops)
    }


def image_files(folder: str | os.PathLike, what: str) -> list[str]:
    """The images of a folder, sorted; refused when there is none."""
    files = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{what}={str(folder)!r}: no .png/.jpg images")
    return files


class EvaluationDataModule(L.LightningDataModule):
    """``test_dataloader()`` returns ``[generated, real]`` loaders of :func:`collate_records`
    batches. ``generated`` (and ``real``) are shard patterns or folders of images named by
    sample key, whose conditions are read from ``conditions`` (default: ``real``); ``keys``
    restricts both the real samples and the conditions to a subset; ``captions`` (key ->
    prompt) replaces the samples' captions (an evaluation's own prompt set). A folder as
    ``real`` is another method's images: the reference of a forgetting check."""

    def __init__(
        self,
        generated: str,
        real: str | Sequence[str],
        resolution: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        fit: Fit = "stretch",
        keys: Sequence[str] | None = None,
        hand_crops: HandCropConfig | dict | None = None,
        conditions: str | Sequence[str] | None = None,
        captions: Mapping[str, str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["keys", "captions"])
        self.real_folder = isinstance(real, str | os.PathLike) and os.path.isdir(real)
        if self.real_folder:
            if not conditions:
                raise ValueError("real is a folder of images: give conditions (the shards)")
            self.real_files = image_files(real, "real")
            self.real_urls = []
        else:
            self.real_urls = expand_shards(real)
        self.condition_urls = expand_shards(conditions) if conditions else self.real_urls
        check_shards(self.real_urls + self.condition_urls)
        self.captions = captions
        self.folder = os.path.isdir(generated)
        if self.folder:
            self.generated_files = image_files(generated, "generated")
        else:
            self.generated_urls = expand_shards(generated)
            check_shards(self.generated_urls)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.fit = fit
        self.keys = frozenset(keys) if keys is not None else None
        if hand_crops is not None and not isinstance(hand_crops, HandCropConfig):
            hand_crops = HandCropConfig(**hand_crops)
        self.hand_crops = hand_crops

    def _shard_loader(self, urls: list[str], what: str, keys: frozenset[str] | None) -> DataLoader:
        world = self.trainer.world_size if self.trainer else 1
        check_split(urls, world, self.num_workers, what)
        records = _ShardRecords(self.resolution, self.fit, keys, self.hand_crops, self.captions)
        pipeline = sample_pipeline(urls, records, seed=0, shuffle=False, resampled=False)
        return self._loader(pipeline)

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_records,
        )

    def _folder_loader(self, files: list[str], conditions: Conditions, what: str) -> DataLoader:
        missing = [f for f in files if Path(f).stem not in conditions]
        if missing:
            raise KeyError(
                f"{len(missing)} {what} image(s) have no sample with their key in "
                f"{self.condition_urls[0]}..., e.g. {missing[0]!r}"
            )
        return self._loader(FolderRecords(files, conditions, self.resolution))

    def test_dataloader(self) -> list[DataLoader]:
        conditions = None
        if self.folder or self.real_folder:
            conditions = read_conditions(
                self.condition_urls, self.resolution, self.fit, self.keys, self.hand_crops,
                self.captions,
            )  # fmt: skip
        if self.folder:
            generated = self._folder_loader(self.generated_files, conditions, "generated")
        else:
            generated = self._shard_loader(self.generated_urls, "generated", None)
        if self.real_folder:
            real = self._folder_loader(
                [f for f in self.real_files if Path(f).stem in conditions], conditions, "real"
            )
        else:
            real = self._shard_loader(self.real_urls, "real", self.keys)
        return [generated, real]
