"""Skeleton and mask rasterisation shared by every datamodule.

Coordinates follow the corner convention: pixel ``i`` covers ``[i, i + 1)``, so a crop at
integer offset ``x0`` maps ``x -> x - x0`` and a resize by ``s`` maps ``x -> x * s``.
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

# 21-point hand (MediaPipe / InterHand2.6M after reordering / HaGRID v2): 0 wrist, then
# thumb, index, middle, ring, pinky, each from base to tip.
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4),
    (0, 5), (5, 6), (6, 7), (7, 8),
    (0, 9), (9, 10), (10, 11), (11, 12),
    (0, 13), (13, 14), (14, 15), (15, 16),
    (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip

# OpenPose's hand palette: edge i has hue i / 20 at full saturation and value; joints blue.
HAND_EDGE_COLORS = tuple(
    tuple(round(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
    for i in range(len(HAND_EDGES))
)
HAND_JOINT_COLOR = (0, 0, 255)

# cv2 draws on an integer grid; 4 fractional bits keep sub-pixel keypoint positions.
_SHIFT = 4


def _fixed(x: float, y: float) -> tuple[int, int]:
    # Corner convention -> cv2's centre convention: pixel i's centre is at i + 0.5.
    scale = 1 << _SHIFT
    return round((x - 0.5) * scale), round((y - 0.5) * scale)


def draw_hand_skeleton(
    canvas: np.ndarray, keypoints: np.ndarray, line_width: int = 2, joint_radius: int = 2
) -> np.ndarray:
    """Draw a 21-point hand in OpenPose colours onto ``canvas`` ``[H, W, 3]`` uint8 RGB, in place.

    Only edges whose two ends are labelled (``v > 0``) are drawn, and only labelled joints.
    """
    labelled = keypoints[:, 2] > 0
    for (a, b), color in zip(HAND_EDGES, HAND_EDGE_COLORS, strict=True):
        if labelled[a] and labelled[b]:
            cv2.line(
                canvas,
                _fixed(*keypoints[a, :2]),
                _fixed(*keypoints[b, :2]),
                color,
                thickness=line_width,
                lineType=cv2.LINE_AA,
                shift=_SHIFT,
            )
    if joint_radius > 0:
        for x, y, _ in keypoints[labelled]:
            cv2.circle(
                canvas,
                _fixed(x, y),
                joint_radius << _SHIFT,
                HAND_JOINT_COLOR,
                thickness=-1,
                lineType=cv2.LINE_AA,
                shift=_SHIFT,
            )
    return canvas


def render_hand_skeleton(
    keypoints: np.ndarray, size: int, line_width: int = 2, joint_radius: int = 2
) -> np.ndarray:
    """Hand skeleton on a black square canvas: ``[size, size, 3]`` uint8."""
    canvas = np.zeros((size, size, 3), np.uint8)
    return draw_hand_skeleton(canvas, keypoints, line_width, joint_radius)


def hull_mask(keypoints: np.ndarray, size: tuple[int, int], dilation: int = 0) -> np.ndarray:
    """Convex hull of the labelled keypoints, dilated by ``dilation`` px: ``[H, W]`` uint8 0/255.

    ``size`` is ``(width, height)``. A stand-in for a real segmentation when a dataset has
    none: it misses finger gaps and the skin beyond the joints, hence the dilation.
    """
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    points = keypoints[keypoints[:, 2] > 0, :2]
    if len(points) == 0:
        return mask
    fixed = np.array([_fixed(x, y) for x, y in points], np.int32)
    hull = cv2.convexHull(fixed)
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_8, shift=_SHIFT)
    if dilation > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1,) * 2)
        mask = cv2.dilate(mask, kernel)
    return mask
