"""Wall time per generated image, as the tables of HumanSD and Giving a Hand report it."""

from __future__ import annotations

import contextlib
import time

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from metrics.dist_sync import EmptyRankSafeSync


class SynchronizedClock:
    """``with SynchronizedClock() as clock: ...``, then ``clock.seconds``: the block's wall time,
    CUDA synchronised before and after so that it covers the GPU work queued inside."""

    seconds: float = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __enter__(self) -> SynchronizedClock:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start


class InferenceTimer(EmptyRankSafeSync, Metric):
    """Seconds per image of a sampling call: median and 90th percentile over calls.

    Use ``with timer.measure(num_images): images = sample(...)``. The first ``warmup`` calls
    (CUDA context, cuDNN autotuning, compilation) are not recorded; CUDA is synchronised before
    and after each call so the time covers the GPU work. Per-call times are gathered across
    DDP ranks.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, warmup: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.warmup = warmup
        self._calls = 0
        self.add_state("seconds_per_image", default=[], dist_reduce_fx="cat")

    def update(self, seconds: float, num_images: int) -> None:
        """Record one call that produced ``num_images`` images in ``seconds``."""
        self._calls += 1
        if self._calls <= self.warmup:
            return
        value = torch.tensor([seconds / num_images], dtype=torch.float64, device=self.device)
        self.seconds_per_image.append(value)

    @contextlib.contextmanager
    def measure(self, num_images: int):
        with SynchronizedClock() as clock:
            yield
        self.update(clock.seconds, num_images)

    def compute(self) -> dict[str, torch.Tensor]:
        if not self.seconds_per_image:
            raise RuntimeError(f"InferenceTimer: no call recorded after {self.warmup} warm-up")
        values = dim_zero_cat(self.seconds_per_image)
        return {"median": values.median(), "p90": torch.quantile(values, 0.9)}
