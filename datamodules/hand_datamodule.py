"""Hand crops from schema shards: the training data of the stage-1 hand generator."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from datamodules.hand_crops import HandCropConfig, hand_crop, visible_hands
from datamodules.latent_cache import (
    StaleCacheError,
    cache_shards,
    cached_examples,
    cached_orientation,
    check_manifest,
    read_manifest,
    source_fingerprint,
)
from datamodules.schema import MIN_IMAGE_SIZE, Sample, person_area
from datamodules.shard_datamodule import ExampleFn, ShardDataModule
from datamodules.shards import SkipCounter, Skipped, expand_shards, sample_pipeline
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
        self.latent_cache = latent_cache
        self.cache_manifest = None
        if latent_cache is not None:
            if not self.val_urls:
                raise ValueError("latent_cache: a cached run needs val_shards (its image grids)")
            self.cache_manifest = read_manifest(latent_cache)
            check_manifest(self.cache_manifest, self.cache_settings(), latent_cache, "examples")
            sources = {"shards": source_fingerprint(self.train_urls)}
            check_manifest(self.cache_manifest, sources, latent_cache, "sources")
            own = {"shards": cache_shards(latent_cache)}
            check_manifest(self.cache_manifest, own, latent_cache, "cache")
            if self.crop.flip_prob > 0 and self.cache_manifest["orientations"] < 2:
                raise StaleCacheError(
                    f"latent_cache={latent_cache!r} holds unflipped crops only but "
                    f"crop.flip_prob={self.crop.flip_prob}: rebuild it with flips on"
                )

    def example_fn(self) -> ExampleFn:
        return partial(hand_examples, config=self.crop)

    def cache_settings(self) -> dict:
        """What the cached examples depend on in this datamodule (flips are drawn at training
        time from the cached orientations)."""
        crop = {k: v for k, v in asdict(self.crop).items() if k != "flip_prob"}
        return {"datamodule": "HandDataModule", "crop": crop, "min_image_size": self.min_image_size}

    @property
    def cache_holds_text(self) -> bool:
        return self.cache_manifest is not None and "text_encoder" in self.cache_manifest["encoder"]

    def check_cache_encoder(self, identity: dict) -> None:
        """Refuse a cache made with another VAE (or text encoder): ``identity`` is the model's
        ``cache_identity(text=cache_holds_text)``, handed in by the experiments layer."""
        if self.latent_cache is not None:
            check_manifest(self.cache_manifest, identity, self.latent_cache, "encoder")

    def cache_entries(self) -> Iterator[list[dict]]:
        """Each training crop once, in every orientation training can draw: ``[unflipped]``
        or ``[unflipped, flipped]`` (the writer's input; shards in order, no shuffle)."""
        views = [replace(self.crop, flip_prob=0.0)]
        if self.crop.flip_prob > 0:
            views.append(replace(self.crop, flip_prob=1.0))

        def entries(samples: Iterable[Sample], counter: SkipCounter) -> Iterator[list[dict]]:
            rng = random.Random(0)  # unused by the forced flips; hand_crop draws it once
            for sample in samples:
                per_view = [list(hand_examples(sample, True, rng, view)) for view in views]
                for pair in zip(*per_view, strict=True):
                    if not isinstance(pair[0], Skipped):
                        yield list(pair)

        yield from sample_pipeline(
            self.train_urls, entries, seed=self.seed, shuffle=False, resampled=False,
            min_image_size=self.min_image_size,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        if self.latent_cache is None:
            return super().train_dataloader()
        urls = expand_shards(str(Path(self.latent_cache) / "train-*.tar"))
        flips = partial(cached_orientation, flip_prob=self.crop.flip_prob)
        decode = partial(cached_examples, tensors=self.cache_manifest["tensors"])
        return self._loader(
            urls, train=True, example_fn=flips, decode=decode, source="latent_cache"
        )
