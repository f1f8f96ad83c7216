"""Hand depth maps and inpainting masks for HandRefiner-style depth-guided hand repair.

HandRefiner (Lu et al., ACM MM 2024) renders a hand mesh (Mesh Graphormer + MANO) to depth;
its insight is that the depth ControlNet, run below full strength, tolerates a depth map that
does not match the image exactly. The offline default here renders the 21 keypoints with
relative depth (MediaPipe's z, or 0 where a dataset has none) as capsules along the bones and
a palm of four triangles, radii proportional to the hand's size. Both the depth normalisation
and the mask rule are those of the released code (``preprocessor/meshgraphormer.py``):
``1 - 0.8 (d - min) / (max - min)`` on the hand (nearest 1.0, farthest 0.2), 0 elsewhere; a
rectangle over the depth pixels and the landmarks, padded per axis by
``max(30 px, 0.15 x side)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# the 21-point hand: wrist 0, then thumb 1-4, index 5-8, middle 9-12, ring 13-16, little 17-20
BONES = tuple(
    (0 if joint == 0 else base + joint - 1, base + joint)
    for base in (1, 5, 9, 13, 17)
    for joint in range(4)
)
PALM = ((0, 1, 5), (0, 5, 9), (0, 9, 13), (0, 13, 17))


def capsule_depth(
    a: np.ndarray, b: np.ndarray, radius: float, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """Front surface of a capsule from ``a`` to ``b`` (x, y, z; smaller z nearer), radius
    ``radius`` px, at pixel centres ``xs``/``ys`` ``[H, W]``: ``z - sqrt(r^2 - dist^2)`` where
    the pixel is within ``radius`` of the segment (``z`` interpolated along it), else inf."""
    ab = b[:2] - a[:2]
    length2 = float(ab @ ab)
    t = np.zeros_like(xs) if length2 == 0 else ((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1]) / length2
    t = np.clip(t, 0.0, 1.0)
    dx, dy = xs - (a[0] + t * ab[0]), ys - (a[1] + t * ab[1])
    dist2 = dx * dx + dy * dy
    z = a[2] + t * (b[2] - a[2])
    return np.where(dist2 <= radius**2, z - np.sqrt(np.maximum(radius**2 - dist2, 0.0)), np.inf)


def triangle_depth(tri: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The plane through the three points ``tri`` ``[3, 3]`` at pixel centres inside the
    triangle (barycentric interpolation of z), else inf."""
    (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = tri
    det = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
    if abs(det) < 1e-9:
        return np.full_like(xs, np.inf)
    w0 = ((y1 - y2) * (xs - x2) + (x2 - x1) * (ys - y2)) / det
    w1 = ((y2 - y0) * (xs - x2) + (x0 - x2) * (ys - y2)) / det
    w2 = 1 - w0 - w1
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
    return np.where(inside, w0 * z0 + w1 * z1 + w2 * z2, np.inf)


def render_hand_depth(
    keypoints: np.ndarray,
    size: tuple[int, int],
    radius_fraction: float = 0.06,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Raw depth ``[H, W]`` (inf where no hand) of one hand's keypoints ``[21, 3]`` (x, y in
    pixels, z relative depth in pixels, smaller nearer) in a ``size`` (width, height) image:
    capsules of radius ``radius_fraction`` x the hand's size along the bones, and the palm.
    ``valid`` ``[21]`` bool: bones and palm triangles touching another keypoint are left out
    (a dataset's unlabelled keypoints)."""
    width, height = size
    valid = np.ones(len(keypoints), bool) if valid is None else np.asarray(valid, bool)
    xy = keypoints[valid, :2]
    if len(xy) == 0:
        return np.full((height, width), np.inf)
    extent = float(np.ptp(xy, 0).max()) if len(xy) else 0.0
    radius = max(radius_fraction * extent, 1.0)
    lo = np.floor(np.maximum(xy.min(0) - radius - 1, 0)).astype(int)
    hi = np.ceil(np.minimum(xy.max(0) + radius + 1, [width, height])).astype(int)
    depth = np.full((height, width), np.inf)
    if (hi <= lo).any():
        return depth
    ys, xs = np.mgrid[lo[1] : hi[1], lo[0] : hi[0]] + 0.5
    region = np.full(xs.shape, np.inf)
    for i, j in BONES:
        if valid[i] and valid[j]:
            region = np.minimum(region, capsule_depth(keypoints[i], keypoints[j], radius, xs, ys))
    for tri in PALM:
        if valid[list(tri)].all():
            region = np.minimum(region, triangle_depth(keypoints[list(tri)], xs, ys))
    depth[lo[1] : hi[1], lo[0] : hi[0]] = region
    return depth


def normalise_depth(depth: np.ndarray) -> np.ndarray:
    """HandRefiner's normalisation: ``1 - 0.8 (d - min) / (max - min)`` where the hand is
    (finite ``d``; nearest 1.0, farthest 0.2), 0 elsewhere; a flat hand is 1.0 throughout."""
    out = np.zeros(depth.shape)
    hand = np.isfinite(depth)
    if not hand.any():
        return out
    lo, hi = depth[hand].min(), depth[hand].max()
    out[hand] = 1.0 if hi == lo else 1.0 - 0.8 * (depth[hand] - lo) / (hi - lo)
    return out


def refiner_mask(
    depth: np.ndarray, keypoints: np.ndarray, min_padding: int = 30, fraction: float = 0.15
) -> np.ndarray:
    """The inpainting mask ``[H, W]`` bool of one hand: the rectangle over its depth pixels
    (``depth > 0``) and keypoints, each axis padded by ``max(min_padding, int(fraction x
    (side + 1)))`` px, clipped to the image (HandRefiner's ``get_mask_bounding_box``)."""
    height, width = depth.shape
    rows, cols = np.nonzero(depth > 0)
    xs = np.concatenate([cols, np.floor(keypoints[:, 0]).astype(int)])
    ys = np.concatenate([rows, np.floor(keypoints[:, 1]).astype(int)])
    mask = np.zeros((height, width), bool)
    box = []
    for values, limit in ((xs, width), (ys, height)):
        lo, hi = int(values.min()), int(values.max())
        pad = max(int((hi - lo + 1) * fraction), min_padding)
        box.append((max(lo - pad, 0), min(hi + pad, limit - 1)))
    (x0, x1), (y0, y1) = box
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


@dataclass
class HandDepth:
    keypoints: np.ndarray  # [21, 3] x, y in image pixels and relative depth z (smaller nearer)
    side: str  # the person's "left" | "right"
    score: float
    depth: np.ndarray  # [H, W] normalised depth of this hand (0 elsewhere; all 0: it failed)
    mask: np.ndarray  # [H, W] bool: the region to inpaint (:func:`refiner_mask`)
    valid: np.ndarray | None = None  # [21] bool: the labelled keypoints (None: all)


def hand_depth(
    keypoints: np.ndarray,
    side: str,
    size: tuple[int, int],
    score: float = 1.0,
    radius_fraction: float = 0.06,
    min_padding: int = 30,
    valid: np.ndarray | None = None,
) -> HandDepth:
    """One hand's :class:`HandDepth` from its keypoints ``[21, 3]`` (x, y px, relative z) in a
    ``size`` (width, height) image; ``valid`` ``[21]``: the keypoints to use."""
    valid = np.ones(len(keypoints), bool) if valid is None else np.asarray(valid, bool)
    depth = normalise_depth(render_hand_depth(keypoints, size, radius_fraction, valid))
    mask = refiner_mask(depth, keypoints[valid], min_padding)
    return HandDepth(keypoints, side, score, depth, mask, valid)


def combine_hands(hands: list[HandDepth], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One depth map ``[H, W]`` and mask ``[H, W]`` bool for all ``hands`` of an image: as the
    release does, hands are drawn farthest first (by the middle finger's knuckle, keypoint 9)
    so a nearer hand's depth overwrites a farther one's; the masks are united."""
    width, height = size
    depth, mask = np.zeros((height, width)), np.zeros((height, width), bool)
    for hand in sorted(hands, key=lambda h: -float(h.keypoints[9, 2])):
        depth = np.where(hand.depth > 0, hand.depth, depth)
        mask |= hand.mask
    return depth, mask


class HandDepthEstimator(Protocol):
    """``estimator(image)``: every hand of an RGB ``[H, W, 3]`` uint8 image with its depth map
    and inpainting mask (an empty list: no hand, the image is left as it is)."""

    def __call__(self, image: np.ndarray) -> list[HandDepth]: ...


class LandmarkHandDepth:
    """The offline default: MediaPipe Hands' 21 landmarks with their relative z (the wheel's
    models; HandRefiner's detection settings: 2 hands, detection and presence confidence 0.6),
    rendered by :func:`render_hand_depth` and normalised per hand as HandRefiner does. The
    high-fidelity alternative is a mesh model's rendered depth behind the same protocol
    (:class:`~pose_estimation.mesh_hand_depth.MeshHandDepth`)."""

    def __init__(
        self,
        max_num_hands: int = 2,
        min_confidence: float = 0.6,
        radius_fraction: float = 0.06,
        min_padding: int = 30,
    ):
        from pose_estimation.mediapipe_hands import MediaPipeHandFinder

        self.finder = MediaPipeHandFinder(
            max_num_hands, min_confidence, min_presence_confidence=min_confidence
        )
        self.radius_fraction = radius_fraction
        self.min_padding = min_padding

    def __call__(self, image: np.ndarray) -> list[HandDepth]:
        height, width = image.shape[:2]
        return [
            hand_depth(
                np.concatenate([hand.keypoints[:, :2], hand.depth[:, None]], 1),
                hand.side,
                (width, height),
                hand.score,
                self.radius_fraction,
                self.min_padding,
            )
            for hand in self.finder(image)
        ]
