"""The Lightning side of shard reading, shared by every training datamodule."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.latent_cache import (
    StaleCacheError,
    cache_shards,
    cached_examples,
    cached_orientation,
    check_manifest,
    read_manifest,
    source_fingerprint,
)
from datamodules.schema import MIN_IMAGE_SIZE, Sample
from datamodules.shards import (
    SkipCounter,
    Skipped,
    StreamPosition,
    check_shards,
    check_split,
    expand_shards,
    sample_pipeline,
    stream_identity,
)

ExampleFn = Callable[[Sample, bool, random.Random], Iterator[dict]]


class _Examples:
    """Pipeline stage: validated samples -> examples, each carrying the skip counts. The
    augmentation draws are seeded like the stream itself (:func:`stream_identity`)."""

    def __init__(self, make: ExampleFn, seed: int, augment: bool, position: StreamPosition):
        self.make = make
        self.seed = seed
        self.augment = augment
        self.position = position
        self.iteration = -1

    def __call__(self, samples: Iterable[Sample], counter: SkipCounter) -> Iterator[dict]:
        self.iteration += 1
        epoch, worker, _ = stream_identity(self.position, self.iteration)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = random.Random(f"{self.seed}/{rank}/{worker}/{epoch}/augment")
        for sample in samples:
            for example in self.make(sample, self.augment, rng):
                if isinstance(example, Skipped):
                    counter.skip_part(sample, example)
                    continue
                example["skipped"] = counter.take()
                yield example


class ShardDataModule(L.LightningDataModule, ABC):
    """Training and validation loaders over schema shards.

    Subclasses define :meth:`example_fn`: a picklable ``fn(sample, augment, rng)`` yielding the
    training examples of one validated sample (``augment`` is True for training data; it runs
    in loader workers, so it must not hold the datamodule or trainer). Shard patterns are
    expanded and checked at construction, so a bad path fails before training starts.

    Latent caches (``datamodules.latent_cache``): a subclass whose only random choice is a
    flip defines :meth:`example_view`, :meth:`cache_settings` and :attr:`flip_prob` and calls
    :meth:`open_latent_cache` once its settings are set; ``latent_cache`` then replaces the
    training stream (validation still reads ``val_shards``, which a cached run needs).
    """

    # tensors of an example carried into a cache as they are (besides what the model encodes)
    cache_passthrough: tuple[str, ...] = ()

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        resampled: bool = True,
        epoch_size: int = 1000,
        shuffle_buffer: int = 256,
        seed: int = 0,
        min_image_size: int = MIN_IMAGE_SIZE,
    ):
        super().__init__()
        self.min_image_size = min_image_size
        self.train_urls = expand_shards(train_shards)
        self.val_urls = expand_shards(val_shards) if val_shards else None
        check_shards(self.train_urls)
        if self.val_urls:
            check_shards(self.val_urls)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resampled = resampled
        self.epoch_size = epoch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.latent_cache: str | None = None
        self.cache_manifest: dict | None = None

    @abstractmethod
    def example_fn(self) -> ExampleFn:
        """The function that turns one sample into examples."""

    # ----------------------------------------------------------------- latent caches
    @property
    def flip_prob(self) -> float:
        """The probability of the one random choice an example makes (a flip)."""
        raise ValueError(f"{type(self).__name__} has no latent cache")

    def example_view(self, flip: bool) -> ExampleFn:
        """:meth:`example_fn` with the flip forced on or off."""
        raise ValueError(f"{type(self).__name__} has no latent cache")

    def cache_settings(self) -> dict:
        """What the cached examples depend on in this datamodule (the flip excepted: it is drawn
        at training time from the cached orientations)."""
        raise ValueError(f"{type(self).__name__} has no latent cache")

    def open_latent_cache(self, latent_cache: str | None) -> None:
        """Check the cache in ``latent_cache`` against this datamodule (refused, naming the key
        that differs) and train from it."""
        if latent_cache is None:
            return
        if not self.val_urls:
            raise ValueError("latent_cache: a cached run needs val_shards (its image grids)")
        manifest = read_manifest(latent_cache)
        check_manifest(manifest, self.cache_settings(), latent_cache, "examples")
        sources = {"shards": source_fingerprint(self.train_urls)}
        check_manifest(manifest, sources, latent_cache, "sources")
        check_manifest(manifest, {"shards": cache_shards(latent_cache)}, latent_cache, "cache")
        if self.flip_prob > 0 and manifest["orientations"] < 2:
            raise StaleCacheError(
                f"latent_cache={latent_cache!r} holds unflipped examples only but "
                f"flip_prob={self.flip_prob}: rebuild it with flips on"
            )
        self.latent_cache, self.cache_manifest = latent_cache, manifest

    @property
    def cache_holds_text(self) -> bool:
        return self.cache_manifest is not None and "text_encoder" in self.cache_manifest["encoder"]

    def check_cache_encoder(self, identity: dict) -> None:
        """Refuse a cache made with another VAE (or text encoder): ``identity`` is the model's
        ``cache_identity(text=cache_holds_text)``, handed in by the experiments layer."""
        if self.latent_cache is not None:
            check_manifest(self.cache_manifest, identity, self.latent_cache, "encoder")

    def cache_entries(self) -> Iterator[list[dict]]:
        """Each training example once, in every orientation training can draw: ``[unflipped]``
        or ``[unflipped, flipped]`` (the cache writer's input; shards in order, no shuffle)."""
        views = [self.example_view(False)]
        if self.flip_prob > 0:
            views.append(self.example_view(True))

        def entries(samples: Iterable[Sample], counter: SkipCounter) -> Iterator[list[dict]]:
            rng = random.Random(0)  # the forced flips make the one draw irrelevant
            for sample in samples:
                per_view = [list(view(sample, True, rng)) for view in views]
                for pair in zip(*per_view, strict=True):
                    if not isinstance(pair[0], Skipped):
                        yield list(pair)

        yield from sample_pipeline(
            self.train_urls, entries, seed=self.seed, shuffle=False, resampled=False,
            min_image_size=self.min_image_size,
        )  # fmt: skip

    # ----------------------------------------------------------------- loaders
    def state_dict(self) -> dict:
        """Where the training stream is (saved in checkpoints by Lightning): the epoch and the
        batches of it this rank trained on, so that a resumed run continues the stream."""
        trainer = self.trainer
        # during fit, also when a checkpoint is written at validation end
        if trainer is None or trainer.state.fn != "fit":
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._resume = StreamPosition(state_dict["epoch"], state_dict["batches"])

    def _loader(
        self,
        urls: list[str],
        train: bool,
        example_fn: ExampleFn | None = None,
        decode: Callable | None = None,
        source: str | None = None,
    ) -> DataLoader:
        """The stream of ``urls``: schema shards through :meth:`example_fn`, or other shards
        (a latent cache) through ``decode`` and ``example_fn``; ``source`` names them in
        errors."""
        resampled = self.resampled and train
        world = self.trainer.world_size if self.trainer else 1
        per_worker = None
        if resampled:
            per_worker = max(1, self.epoch_size // (world * max(self.num_workers, 1)))
        else:
            what = source or ("train_shards" if train else "val_shards")
            check_split(urls, world, self.num_workers, what)
        # a resumed run continues the stream where its checkpoint left it (once)
        resume = getattr(self, "_resume", None) if train else None
        if train:
            self._resume = None
        position = (
            StreamPosition(resume.epoch, resume.batches, self.batch_size)
            if resume
            else (StreamPosition(batch_size=self.batch_size))
        )
        pipeline = sample_pipeline(
            urls,
            _Examples(example_fn or self.example_fn(), self.seed, augment=train, position=position),
            seed=self.seed,
            shuffle=train,
            resampled=resampled,
            shuffle_buffer=self.shuffle_buffer,
            epoch_size=per_worker,
            min_image_size=self.min_image_size,
            position=position,
            decode=decode,
        )
        return DataLoader(
            pipeline,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # the skip counts stay on the CPU: the monitor adds them up every step, and reading
        # them back from a GPU would synchronise the host each time
        skipped = batch.pop("skipped", None) if isinstance(batch, dict) else None
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if skipped is not None:
            batch["skipped"] = skipped
        return batch

    def train_dataloader(self) -> DataLoader:
        if self.latent_cache is None:
            return self._loader(self.train_urls, train=True)
        urls = expand_shards(str(Path(self.latent_cache) / "train-*.tar"))
        flips = partial(cached_orientation, flip_prob=self.flip_prob)
        decode = partial(cached_examples, tensors=self.cache_manifest["tensors"])
        return self._loader(
            urls, train=True, example_fn=flips, decode=decode, source="latent_cache"
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_urls, train=False) if self.val_urls else []
