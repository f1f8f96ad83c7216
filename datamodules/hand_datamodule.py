"""Hand crops from schema shards: the training data of the stage-1 hand generator."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from functools import partial

from datamodules.hand_crops import HandCropConfig, hand_crop, visible_hands
from datamodules.schema import MIN_IMAGE_SIZE, Sample, person_area
from datamodules.shard_datamodule import ExampleFn, ShardDataModule
from datamodules.shards import Skipped
from pose_estimation.keypoints import keypoint_extent


def hand_examples(
    sample: Sample, augment: bool, rng: random.Random, config: HandCropConfig
) -> Iterator[dict]:
    """One crop per visible hand (``hand_key`` = ``<key>_hand<n>``, ``person_area``: the area of
    its person's keypoint box in crop pixels), and a :class:`~datamodules.shards.Skipped` for
    each hand smaller than ``config.min_hand_size``; no flips for validation data."""
    config = config if augment else replace(config, flip_prob=0.0)
    for n, (keypoints, is_right, person) in enumerate(visible_hands(sample, config)):
        extent = keypoint_extent(keypoints)
        if extent < config.min_hand_size:
            side = "right" if is_right else "left"
            yield Skipped(
                "too_small", f"{side} hand spans {extent:.1f} px < {config.min_hand_size}"
            )
            continue
        example = hand_crop(sample, keypoints, is_right, config, rng)
        example["hand_key"] = f"{sample.key}_hand{n}"
        example["person_area"] = person_area(person) * example["crop_scale"] ** 2
        yield example


class HandDataModule(ShardDataModule):
    """Square hand crops (image, skeleton, mask, caption, handedness) from schema shards.

    Batches: ``image`` ``[B, 3, R, R]`` in [-1, 1]; ``pose_image`` ``[B, 3, R, R]`` in [0, 1];
    ``mask`` ``[B, 1, R, R]`` in {0, 1}; ``mask_from_file`` ``[B]`` bool (False: keypoint hull);
    ``keypoints`` ``[B, 21, 3]``; ``is_right`` ``[B]`` bool; ``caption``/``key`` lists of str;
    ``skipped`` ``[B, len(SKIP_REASONS)]`` counts of samples skipped before each example.

    ``latent_cache``: a folder written by ``make cache-latents`` for these train shards and
    crop settings; training batches then carry ``latent_mean``, ``latent_std``, ``pose_latent``
    (or ``pose_image``), ``mask_latent`` and optionally ``text_embedding`` instead of pixels
    (validation still reads ``val_shards``, which a cached run needs for its image grids).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        crop: HandCropConfig | dict | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        resampled: bool = True,
        epoch_size: int = 1000,
        shuffle_buffer: int = 256,
        seed: int = 0,
        min_image_size: int = MIN_IMAGE_SIZE,
        latent_cache: str | None = None,
    ):
        super().__init__(
            train_shards,
            val_shards,
            batch_size,
            num_workers,
            resampled,
            epoch_size,
            shuffle_buffer,
            seed,
            min_image_size,
        )
        self.save_hyperparameters(logger=False)
        self.crop = crop if isinstance(crop, HandCropConfig) else HandCropConfig(**(crop or {}))
        self.open_latent_cache(latent_cache)

    def example_fn(self) -> ExampleFn:
        return partial(hand_examples, config=self.crop)

    @property
    def flip_prob(self) -> float:
        return self.crop.flip_prob

    def example_view(self, flip: bool) -> ExampleFn:
        return partial(hand_examples, config=replace(self.crop, flip_prob=float(flip)))

    def cache_settings(self) -> dict:
        crop = {k: v for k, v in asdict(self.crop).items() if k != "flip_prob"}
        return {"datamodule": "HandDataModule", "crop": crop, "min_image_size": self.min_image_size}
