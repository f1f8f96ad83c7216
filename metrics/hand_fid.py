"""FID-H and KID-H: FID and KID on hand crops, one crop rule for real and generated images.

Hand papers report FID/KID on hands (AttentionHand, Hand1000, HandRefiner) each with their own
detector and crop. Here a hand's crop is the square centred on the box of its labelled
keypoints, side ``(1 + 2 * padding)`` x the box's longer side (``padding`` 0.25 of the hand on
each side), sampled with torchvision's ``roi_align`` (zeros outside the image, area-averaged
when shrinking) to the Inception input of 299 px. Real images are cropped at their labelled
hands, generated images at the hands they were conditioned on, so a generated image whose hand
is missing or misplaced shows that in its crop. Hands with fewer than ``min_keypoints``
labelled keypoints or smaller than ``min_size`` px are left out on both sides.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchvision.ops import roi_align

from metrics.fid_kid import FID, KID

CROP_SIZE = 299  # the standard Inception input: no further resize inside the feature net


def hand_boxes(
    hands: torch.Tensor, padding: float = 0.25, min_size: float = 16.0, min_keypoints: int = 5
) -> torch.Tensor:
    """Square crop boxes ``[M, 4]`` (x0, y0, x1, y1) of the qualifying hands ``[Q, 21, 3]``."""
    boxes = []
    for hand in hands.double():
        points = hand[hand[:, 2] > 0, :2]
        if len(points) < min_keypoints:
            continue
        lo, hi = points.min(0).values, points.max(0).values
        extent = float((hi - lo).max())
        if extent < min_size:
            continue
        centre, half = (lo + hi) / 2, extent * (1 + 2 * padding) / 2
        boxes.append(torch.cat([centre - half, centre + half]))
    return torch.stack(boxes) if boxes else torch.zeros(0, 4, dtype=torch.float64)


def crop_hands(
    images: torch.Tensor, hands: list[torch.Tensor], size: int = CROP_SIZE, **rule
) -> torch.Tensor:
    """Hand crops ``[M, 3, size, size]`` of ``images`` ``[B, 3, H, W]`` at each image's hands
    ``[Q_b, 21, 3]`` (:func:`hand_boxes`; ``rule``: its padding and limits)."""
    boxes = [hand_boxes(h.cpu(), **rule).to(images) for h in hands]
    if sum(len(b) for b in boxes) == 0:
        return images.new_zeros(0, 3, size, size)
    return roi_align(images, boxes, output_size=size, aligned=True, sampling_ratio=-1)


class HandFIDKID(Metric):
    """FID-H and KID-H: ``update(images, hands, real)`` crops every qualifying hand
    (:func:`crop_hands`) and adds its Inception features to an :class:`~metrics.fid_kid.FID`
    and a :class:`~metrics.fid_kid.KID` (synced under DDP like those). ``compute()``:
    ``fid_h``, ``kid_h_mean``, ``kid_h_std`` and the crop counts; NaN while either side has
    fewer than two crops. ``feature_extractor``: shared with the image-level FID (one
    Inception in memory)."""

    full_state_update = False

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        subsets: int = 100,
        subset_size: int = 1000,
        inception_weights: str | None = None,
        antialias: bool = True,
        seed: int = 0,
        padding: float = 0.25,
        min_size: float = 16.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.fid = FID(feature_extractor, inception_weights, antialias)
        self.kid = KID(
            feature_extractor, subsets, subset_size, inception_weights, antialias, seed=seed
        )
        self.subset_size = subset_size
        self.rule = {"padding": padding, "min_size": min_size}

    def update(self, images: torch.Tensor, hands: list[torch.Tensor], real: bool) -> None:
        crops = crop_hands(images, hands, **self.rule)
        if len(crops):
            self.fid.update(crops, real=real)
            self.kid.update(crops, real=real)

    def counts(self) -> tuple[int, int]:
        """Real and generated crops over all ranks."""
        counts = torch.tensor(
            [int(self.fid.real_features_num_samples), int(self.fid.fake_features_num_samples)],
            device=self.device,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        return int(counts[0]), int(counts[1])

    def compute(self) -> dict[str, torch.Tensor]:
        n_real, n_fake = self.counts()
        out = {
            "n_hand_crops_real": torch.tensor(n_real),
            "n_hand_crops_generated": torch.tensor(n_fake),
        }
        if min(n_real, n_fake) < 2:
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            return {"fid_h": nan, "kid_h_mean": nan, "kid_h_std": nan, **out}
        self.kid.subset_size = min(self.subset_size, n_real, n_fake)
        kid_mean, kid_std = self.kid.compute()
        return {"fid_h": self.fid.compute(), "kid_h_mean": kid_mean, "kid_h_std": kid_std, **out}

    def reset(self) -> None:
        super().reset()
        self.fid.reset()
        self.kid.reset()
