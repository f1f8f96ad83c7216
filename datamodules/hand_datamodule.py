"""Hand crops from schema shards: the training data of the stage-1 hand generator."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, get_worker_info

from datamodules.hand_crops import HandCropConfig, hand_crop, visible_hands
from datamodules.schema import Sample
from datamodules.shards import (
    SkipCounter,
    check_shards,
    check_split,
    expand_shards,
    sample_pipeline,
)


class _HandExamples:
    """Pipeline stage: validated samples -> one example per visible hand."""

    def __init__(self, config: HandCropConfig, seed: int, augment: bool):
        self.config = config
        self.seed = seed
        self.augment = augment

    def __call__(self, samples: Iterable[Sample], counter: SkipCounter) -> Iterator[dict]:
        info = get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = random.Random(f"{self.seed}/{rank}/{info.id if info else 0}")
        config = self.config
        if not self.augment:
            config = HandCropConfig(**{**vars(config), "flip_prob": 0.0})
        for sample in samples:
            for keypoints, is_right in visible_hands(sample, config):
                example = hand_crop(sample, keypoints, is_right, config, rng)
                example["skipped"] = counter.take()
                yield example


class HandDataModule(L.LightningDataModule):
    """Square hand crops (image, skeleton, mask, caption, handedness) from schema shards.

    Batches: ``image`` ``[B, 3, R, R]`` in [-1, 1]; ``pose_image`` ``[B, 3, R, R]`` in [0, 1];
    ``mask`` ``[B, 1, R, R]`` in {0, 1}; ``mask_from_file`` ``[B]`` bool (False: keypoint hull);
    ``keypoints`` ``[B, 21, 3]``; ``is_right`` ``[B]`` bool; ``caption``/``key`` lists of str;
    ``skipped`` ``[B, len(SKIP_REASONS)]`` counts of samples skipped before each example.
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
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.crop = crop if isinstance(crop, HandCropConfig) else HandCropConfig(**(crop or {}))
        # Expanded and checked here so that a bad path fails before training starts.
        self.train_urls = expand_shards(train_shards)
        self.val_urls = expand_shards(val_shards) if val_shards else None
        check_shards(self.train_urls + (self.val_urls or []))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resampled = resampled
        self.epoch_size = epoch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed

    def _loader(self, urls: list[str], train: bool) -> DataLoader:
        resampled = self.resampled and train
        if not resampled:
            world = self.trainer.world_size if self.trainer else 1
            check_split(urls, world, self.num_workers, "train_shards" if train else "val_shards")
        per_worker = None
        if resampled:
            world = self.trainer.world_size if self.trainer else 1
            per_worker = max(1, self.epoch_size // (world * max(self.num_workers, 1)))
        pipeline = sample_pipeline(
            urls,
            _HandExamples(self.crop, self.seed, augment=train),
            seed=self.seed,
            shuffle=train,
            resampled=resampled,
            shuffle_buffer=self.shuffle_buffer,
            epoch_size=per_worker,
        )
        return DataLoader(
            pipeline,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_urls, train=False) if self.val_urls else []
