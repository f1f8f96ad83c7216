"""Pasting generated hands onto the full-body canvas (Giving a Hand, stage 1 -> stage 2).

Each hand image comes with the 21 keypoints it was generated for (crop coordinates). A
least-squares similarity transform (rotation, uniform scale, translation; Umeyama 1991, via
scikit-image) maps them onto the hand's keypoints in the full-body pose; the hand, cut out by
its predicted mask, is warped with it onto an empty canvas.

Stage-1 hands are generated at crop resolution (e.g. 512 px) and land 8-15x smaller on the
body canvas; an affine warp with bilinear sampling at that ratio aliases (it reads 4 of every
~100 source pixels), while the outpainter was trained on real hands resized with
antialiasing. A downscaling transform is therefore split into an area-averaging resize
(``cv2.INTER_AREA``) by its scale and a warp at about unit scale.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.transform import SimilarityTransform


def align_hand(crop_keypoints: np.ndarray, body_keypoints: np.ndarray) -> np.ndarray:
    """Similarity transform ``[3, 3]`` (crop pixels -> image pixels) taking ``crop_keypoints``
    ``[21, 3]`` onto ``body_keypoints``."""
    both = (crop_keypoints[:, 2] > 0) & (body_keypoints[:, 2] > 0)
    if both.sum() < 2:
        raise ValueError("aligning a hand needs at least two keypoints labelled in both")
    src, dst = crop_keypoints[both, :2], body_keypoints[both, :2]
    transform = SimilarityTransform.from_estimate(src, dst)
    if not transform:  # scikit-image returns a falsy failure object for degenerate points
        raise ValueError(f"no similarity transform fits these keypoints: {transform}")
    return transform.params


def prefiltered(
    image: np.ndarray, mask: np.ndarray, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area-downscale ``image`` ``[h, w, 3]`` and ``mask`` ``[h, w]`` by the scale of the
    similarity ``matrix`` ``[3, 3]`` when it shrinks them; returns them with the matrix from
    the resized crop's pixels to the image's (unchanged when the transform does not shrink)."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    height, width = mask.shape
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if scale >= 1 or (new_w, new_h) == (width, height):
        return image, mask, matrix
    image = cv2.resize(image.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)
    # resized pixel u' covers original u = u' * (w / w'), in the corner convention
    upscale = np.diag([width / new_w, height / new_h, 1.0])
    return image, mask, matrix @ upscale


def paste_hands(
    size: tuple[int, int],
    hands: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Warp each ``(image [h, w, 3] float [0, 1], mask [h, w] float [0, 1], matrix [3, 3])``,
    the matrix from :func:`align_hand`, onto an
    empty canvas of ``size`` = (W, H). Returns the canvas ``[H, W, 3]`` (0 outside the hands)
    and the known-region mask ``[H, W]`` in {0, 1}; later hands cover earlier ones."""
    width, height = size
    canvas = np.zeros((height, width, 3), np.float32)
    known = np.zeros((height, width), np.float32)
    for image, mask, matrix in hands:
        image, mask, crop_to_image = prefiltered(image, mask, matrix)
        # cv2 works in pixel-centre coordinates, the keypoints in pixel-corner ones
        shift = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
        unshift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        matrix = (shift @ crop_to_image @ unshift)[:2].astype(np.float32)
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
