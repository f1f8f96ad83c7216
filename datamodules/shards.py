"""WebDataset shard lists and the validated sample stream every datamodule builds on."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import get_worker_info

from datamodules.schema import MIN_IMAGE_SIZE, SKIP_REASONS, Sample, SampleError, decode_sample

log = logging.getLogger(__name__)

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")


class ShardError(RuntimeError):
    """A shard that cannot be found or read; the message names it."""


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Expand brace (``train-{000..009}.tar``) and glob (``*/train-*.tar``) patterns.

    Local patterns that match nothing are an error naming the pattern; remote URLs
    (``pipe:``, ``http(s)://``, ...) are passed through unchecked.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand(str(pattern)):
            if expanded.startswith(_REMOTE_PREFIXES):
                urls.append(expanded)
                continue
            matches = sorted(glob.glob(os.path.expanduser(expanded)))
            if not matches:
                raise ShardError(f"shard pattern {pattern!r} matches no file ({expanded!r})")
            urls.extend(matches)
    if not urls:
        raise ShardError(f"no shards in {list(patterns)!r}")
    return urls


def _has_members(url: str) -> bool:
    with tarfile.open(url) as tar:
        return tar.next() is not None


def check_shards(urls: Sequence[str]) -> None:
    """Fail early, naming the shard, if a local shard is not a readable tar file, and if no
    local shard holds anything (a set of empty tars would make training wait forever). Only
    each tar's first header is read: damage further in is met, and skipped, while reading."""
    local = [u for u in urls if not u.startswith(_REMOTE_PREFIXES)]
    for url in local:
        if not os.path.isfile(url):
            raise ShardError(f"shard {url!r} does not exist")
        if not tarfile.is_tarfile(url):
            raise ShardError(f"shard {url!r} is not a tar file")
    if local and len(local) == len(urls) and not any(_has_members(u) for u in local):
        raise ShardError(f"every shard is empty ({len(local)}: {local[0]!r}, ...): no sample")


def check_split(urls: Sequence[str], world_size: int, num_workers: int, what: str) -> None:
    """Exactly-once reading splits shards over ranks, then workers: each needs one."""
    needed = world_size * max(num_workers, 1)
    if len(urls) < needed:
        raise ValueError(
            f"{what}: {len(urls)} shard(s) cannot be split over {world_size} rank(s) x "
            f"{max(num_workers, 1)} worker(s); write at least {needed} shards "
            f"(or, for training data, use resampled: true)"
        )


class SkipCounter:
    """Counts schema violations per reason; logs each skipped sample with its key and shard.

    Workers cannot share state with the trainer, so :meth:`take` returns the counts since its
    last call as a ``[len(SKIP_REASONS)]`` tensor that travels inside the next example. Counts
    of samples skipped after the last example of a finite stream never reach the trainer;
    the log line of each skipped sample still reports it.
    """

    def __init__(self) -> None:
        self.pending = torch.zeros(len(SKIP_REASONS), dtype=torch.long)

    def skip(self, raw: dict, error: SampleError) -> None:
        self.pending[SKIP_REASONS.index(error.reason)] += 1
        log.warning(
            "skipped sample %r of shard %r: %s", raw.get("__key__"), raw.get("__url__"), error
        )

    def skip_part(self, sample: Sample, skipped: Skipped) -> None:
        self.pending[SKIP_REASONS.index(skipped.reason)] += 1
        log.warning("skipped part of sample %r of shard %r: %s", sample.key, sample.url,
                    skipped.detail)  # fmt: skip

    def take(self) -> torch.Tensor:
        taken, self.pending = self.pending, torch.zeros_like(self.pending)
        return taken


class ShardReader:
    """Watches the shard stream of one loader worker.

    :meth:`shards` passes shard URLs through, remembering the one being read, and stops the
    stream with a :class:`ShardError` when ``stall_limit`` shards in a row gave no example
    (a resampled stream over shards with nothing usable would otherwise loop forever);
    :meth:`examples` resets that count for every example. :meth:`handler` is webdataset's
    exception handler: a shard that cannot be read further (truncated, corrupt, a duplicate
    member) is logged with its name, counted as ``unreadable_shard`` and reading goes on.
    """

    def __init__(self, counter: SkipCounter, stall_limit: int | None):
        self.counter = counter
        self.stall_limit = stall_limit
        self.current: str | None = None
        self.failed = False  # the current shard already failed (webdataset may report twice)
        self.without_example = 0

    def shards(self, src: Iterable[dict]) -> Iterator[dict]:
        for shard in src:
            self.current, self.failed = shard.get("url"), False
            self.without_example += 1
            if self.stall_limit is not None and self.without_example > self.stall_limit:
                raise ShardError(
                    f"no usable sample in {self.stall_limit} shard reads in a row (the last "
                    f"{self.current!r}): the shards are empty, unreadable or every sample is "
                    "skipped (see the warnings above)"
                )
            yield shard

    def examples(self, src: Iterable[dict]) -> Iterator[dict]:
        for example in src:
            self.without_example = 0
            yield example

    def handler(self, exn: Exception) -> bool:
        reason = str(exn.args[0]) if exn.args else type(exn).__name__
        if "duplicate file name" in reason:  # one member dropped, the shard goes on
            log.warning("shard %r: %s; kept the first", self.current, reason)
            return True
        if not self.failed:
            self.failed = True
            self.counter.pending[SKIP_REASONS.index("unreadable_shard")] += 1
            log.warning("shard %r: %s; skipped what was left of it", self.current, reason)
        return True


@dataclass
class Skipped:
    """Yielded by an example function instead of an example: a part of a sample (e.g. one
    hand) that does not become an example, and why (one of :data:`SKIP_REASONS`)."""

    reason: str
    detail: str


def validated_samples(
    src: Iterable[dict], counter: SkipCounter, min_image_size: int = MIN_IMAGE_SIZE
) -> Iterator[Sample]:
    """Decode raw samples, skipping (and counting) those that break the schema."""
    for raw in src:
        try:
            yield decode_sample(raw, min_image_size)
        except SampleError as error:
            counter.skip(raw, error)


@dataclass
class StreamPosition:
    """Where a resampled training stream starts: ``epoch`` and the ``batches`` of that epoch
    one rank already trained on (batches of ``batch_size`` from ``num_workers`` loader workers,
    handed out round robin, as torch's DataLoader does)."""

    epoch: int = 0
    batches: int = 0
    batch_size: int = 1


def stream_identity(position: StreamPosition, iteration: int) -> tuple[int, int, int]:
    """``(epoch, virtual worker, examples to skip)`` of a loader worker's ``iteration``-th pass
    (0 = the first since the loader was built).

    Every random choice of a pass is seeded by (seed, rank, virtual worker, epoch), so the
    stream is a function of those, not of how often the run was interrupted. On the first pass
    after a resume, the workers take the identities that hand out the next batch first
    (worker ``w`` plays ``(w + batches) % W``) and each skips what its identity already gave.
    """
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info else (1, 0)
    if iteration > 0:
        return position.epoch + iteration, worker, 0
    virtual = (worker + position.batches) % workers
    given = max(0, (position.batches - virtual + workers - 1) // workers)
    return position.epoch, virtual, given * position.batch_size


class ResampledStream:
    """The stages of an endless (resampled) training stream that make it resumable: shard
    draws, the shuffle and the per-pass example window, all seeded by :func:`stream_identity`.
    One instance lives in each loader worker (a copy of the loader's)."""

    def __init__(self, urls: Sequence[str], seed: int, position: StreamPosition, per_worker: int):
        self.urls = list(urls)
        self.seed = seed
        self.position = position
        self.per_worker = per_worker
        self.iteration = -1
        self.identity = (0, 0, 0)

    def _rng(self, purpose: str) -> random.Random:
        epoch, virtual, _ = self.identity
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return random.Random(f"{self.seed}/{rank}/{virtual}/{epoch}/{purpose}")

    def shards(self) -> Iterator[dict]:
        """The first stage: called once per pass, draws shards with replacement."""
        self.iteration += 1
        self.identity = stream_identity(self.position, self.iteration)
        rng = self._rng("shards")
        while True:
            yield {"url": rng.choice(self.urls)}

    def shuffle(self, src: Iterable[dict], bufsize: int) -> Iterator[dict]:
        iterator = iter(src)
        first = next(iterator, None)
        if first is None:
            return
        # seeded only now: the pass's identity is set once its first shard has been drawn
        rng = self._rng("shuffle")
        samples = itertools.chain([first], iterator)
        yield from wds.filters._shuffle(samples, bufsize, min(64, bufsize), rng=rng)

    def window(self, src: Iterable[dict]) -> Iterator[dict]:
        """The pass's ``per_worker`` examples, less those its identity gave before a resume."""
        skip = 0
        for n, example in enumerate(src):
            if n == 0:  # the pass's identity is set once its first shard has been drawn
                skip = min(self.identity[2], self.per_worker)
            if n >= self.per_worker:
                return
            if n >= skip:
                yield example


def sample_pipeline(
    urls: Sequence[str],
    to_examples: Callable[[Iterable[Sample], SkipCounter], Iterator[dict]],
    *,
    seed: int,
    shuffle: bool,
    resampled: bool,
    shuffle_buffer: int = 256,
    epoch_size: int | None = None,
    min_image_size: int = MIN_IMAGE_SIZE,
    position: StreamPosition | None = None,
    decode: Callable[[Iterable[dict], SkipCounter], Iterator] | None = None,
) -> wds.DataPipeline:
    """Shards -> raw samples -> validated :class:`Sample` -> examples built by ``to_examples``.
    ``decode`` replaces the schema decoding (raw samples -> what ``to_examples`` takes; a
    latent cache's entries).

    ``resampled=True`` (training): every rank and worker draws shards with replacement, seeded
    by (``seed``, rank, worker, epoch), and ``epoch_size`` examples per worker make an epoch;
    ``position`` resumes such a stream where a run left it (:class:`ResampledStream`).
    ``resampled=False``: the (optionally seed-shuffled) shard list is split by rank, then by
    worker, so every shard is read exactly once per epoch; this needs at least
    ``world_size * num_workers`` shards. Samples are shuffled in a buffer before decoding.
    """
    counter = SkipCounter()
    # A resampled stream is endless: 20 draws per shard in a row without an example leave a
    # set with one good shard unnoticed with probability e^-20; a finite stream just ends.
    reader = ShardReader(counter, 20 * len(urls) if resampled else None)
    stream = None
    if resampled:
        if epoch_size is None:
            raise ValueError("a resampled stream is endless: give epoch_size")
        stream = ResampledStream(urls, seed, position or StreamPosition(), epoch_size)
        stages: list = [stream.shards]
    else:
        stages = [
            wds.SimpleShardList(list(urls), seed=seed if shuffle else None),
            wds.split_by_node,
            wds.split_by_worker,
        ]
    stages += [reader.shards, wds.tarfile_to_samples(handler=reader.handler)]
    if shuffle and stream is not None:
        stages.append(lambda src: stream.shuffle(src, shuffle_buffer))
    elif shuffle:
        stages.append(wds.detshuffle(shuffle_buffer, initial=min(64, shuffle_buffer), seed=seed))
    if decode is None:
        decode = lambda src, counter: validated_samples(src, counter, min_image_size)  # noqa: E731
    stages.append(lambda src: reader.examples(to_examples(decode(src, counter), counter)))
    if stream is not None:
        stages.append(stream.window)
    pipeline = wds.DataPipeline(*stages)
    if stream is None and epoch_size is not None:
        pipeline = pipeline.with_epoch(epoch_size)
    return pipeline
