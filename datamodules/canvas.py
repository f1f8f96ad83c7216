"""Pasting generated hands onto the full-body canvas (Giving a Hand, stage 1 -> stage 2).

Each hand image comes with the 21 keypoints it was generated for (crop coordinates). A
least-squares similarity transform (rotation, uniform scale, translation; Umeyama 1991, via
scikit-image) maps them onto the hand's keypoints in the full-body pose; the hand, cut out by
its predicted mask, is warped with it onto an empty canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.transform import SimilarityTransform


@dataclass
class Alignment:
    matrix: np.ndarray  # [3, 3] crop pixels -> image pixels
    rms_error: float  # px, over the keypoints labelled in both


def align_hand(crop_keypoints: np.ndarray, body_keypoints: np.ndarray) -> Alignment:
    """Similarity transform taking ``crop_keypoints`` ``[21, 3]`` onto ``body_keypoints``."""
    both = (crop_keypoints[:, 2] > 0) & (body_keypoints[:, 2] > 0)
    if both.sum() < 2:
        raise ValueError("aligning a hand needs at least two keypoints labelled in both")
    src, dst = crop_keypoints[both, :2], body_keypoints[both, :2]
    transform = SimilarityTransform.from_estimate(src, dst)
    if not transform:  # scikit-image returns a falsy failure object for degenerate points
        raise ValueError(f"no similarity transform fits these keypoints: {transform}")
    error = np.sqrt(((transform(src) - dst) ** 2).sum(1).mean())
    return Alignment(transform.params, float(error))


def paste_hands(
    size: tuple[int, int],
    hands: list[tuple[np.ndarray, np.ndarray, Alignment]],
) -> tuple[np.ndarray, np.ndarray]:
    """Warp each ``(image [h, w, 3] float [0, 1], mask [h, w] float [0, 1], alignment)`` onto an
    empty canvas of ``size`` = (W, H). Returns the canvas ``[H, W, 3]`` (0 outside the hands)
    and the known-region mask ``[H, W]`` in {0, 1}; later hands cover earlier ones."""
    width, height = size
    canvas = np.zeros((height, width, 3), np.float32)
    known = np.zeros((height, width), np.float32)
    for image, mask, alignment in hands:
        # cv2 works in pixel-centre coordinates, the keypoints in pixel-corner ones
        shift = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
        unshift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        matrix = (shift @ alignment.matrix @ unshift)[:2].astype(np.float32)
        warped = cv2.warpAffine(
            image.astype(np.float32), matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0
        )
        warped_mask = (
            cv2.warpAffine(
                mask.astype(np.float32),
                matrix,
                (width, height),
                flags=cv2.INTER_LINEAR,
                borderValue=0,
            )
            > 0.5
        )
        canvas[warped_mask] = warped[warped_mask]
        known[warped_mask] = 1
    return canvas, known
