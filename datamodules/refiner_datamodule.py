"""Training examples for HandRefiner: image, padded hand mask, hand depth map, caption.

The release trains on rendered synthetic hands with their mesh depth; here the depth is
rendered from each labelled hand's keypoints (:func:`pose_estimation.hand_depth.hand_depth`:
capsules along the bones and the palm; all keypoints at z = 0, the schema being 2-D, so the
relief is the capsules'), so any schema shard with hand keypoints trains the refiner; the mask
is the release's padded rectangle per hand, united over the hands of the image.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from datamodules.full_body_datamodule import flip_people, letterbox
from datamodules.schema import MIN_IMAGE_SIZE, Person, Sample
from datamodules.shard_datamodule import ExampleFn, ShardDataModule
from pose_estimation.hand_depth import HandDepth, combine_hands, hand_depth


@dataclass
class RefinerDataConfig:
    resolution: int = 128
    min_padding: int = 8  # px at ``resolution`` (the release's 30 px is at 512)
    radius_fraction: float = 0.06  # capsule radius, x the hand's size
    min_keypoints: int = 10  # labelled keypoints a hand needs to be drawn
    min_hand_size: float = 4.0  # px: smaller hands are not drawn
    flip_prob: float = 0.5


def people_hand_depths(
    people: list[Person],
    size: tuple[int, int],
    min_padding: int,
    radius_fraction: float = 0.06,
    min_keypoints: int = 10,
    min_hand_size: float = 4.0,
) -> tuple[list[HandDepth], list[dict]]:
    """Depth and mask of every labelled hand of ``people`` (keypoints in pixels of a ``size``
    image, z = 0: the schema holds 2-D keypoints), and a record per hand left out: ``{"side",
    "reason"}`` (too few labelled keypoints, too small)."""
    hands, skipped = [], []
    for person in people:
        for side, kp in (("left", person.left_hand), ("right", person.right_hand)):
            if kp is None:
                continue
            valid = kp[:, 2] > 0
            if valid.sum() < min_keypoints:
                skipped.append({"side": side, "reason": f"{int(valid.sum())} labelled keypoints"})
                continue
            extent = float(np.ptp(kp[valid, :2], 0).max())
            if extent < min_hand_size:
                skipped.append(
                    {"side": side, "reason": f"too small ({extent:.1f} px < {min_hand_size})"}
                )
                continue
            xyz = np.concatenate([kp[:, :2], np.zeros((len(kp), 1))], 1).astype(np.float64)
            hands.append(
                hand_depth(xyz, side, size, 1.0, radius_fraction, min_padding, valid=valid)
            )
    return hands, skipped


def refiner_example(
    sample: Sample, augment: bool, rng: random.Random, config: RefinerDataConfig
) -> Iterator[dict]:
    """One example per image with at least one drawable hand: ``image`` ``[3, R, R]`` in
    [-1, 1], ``hand_mask`` ``[1, R, R]`` in {0, 1} (1 = inpaint), ``depth`` ``[1, R, R]`` in
    [0, 1], ``caption``, ``key``."""
    res = config.resolution
    pixels, _, people = letterbox(sample, res)
    if augment and rng.random() < config.flip_prob:
        pixels = pixels[:, ::-1]
        people = flip_people(people, res)
    hands, _ = people_hand_depths(
        people, (res, res), config.min_padding, config.radius_fraction, config.min_keypoints,
        config.min_hand_size,
    )  # fmt: skip
    if not hands:
        return
    depth, mask = combine_hands(hands, (res, res))
    yield {
        "image": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1,
        "hand_mask": torch.from_numpy(mask.astype(np.float32))[None],
        "depth": torch.from_numpy(depth.astype(np.float32))[None],
        "caption": sample.caption,
        "key": sample.key,
    }


class RefinerDataModule(ShardDataModule):
    """HandRefiner training data (see :func:`refiner_example`)."""

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        refiner: RefinerDataConfig | dict | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        resampled: bool = True,
        epoch_size: int = 1000,
        shuffle_buffer: int = 256,
        seed: int = 0,
        min_image_size: int = MIN_IMAGE_SIZE,
    ):
        super().__init__(
            train_shards, val_shards, batch_size, num_workers, resampled, epoch_size,
            shuffle_buffer, seed, min_image_size,
        )  # fmt: skip
        self.save_hyperparameters(logger=False)
        if not isinstance(refiner, RefinerDataConfig):
            refiner = RefinerDataConfig(**(refiner or {}))
        self.refiner = refiner

    def example_fn(self) -> ExampleFn:
        return partial(refiner_example, config=self.refiner)
