"""Keypoint geometry every layer shares (data, estimators, metrics)."""

from __future__ import annotations

import numpy as np


def keypoint_extent(keypoints: np.ndarray) -> float:
    """Longest side of the box of the labelled (``v > 0``) keypoints of ``[K, 3]``: a hand's
    size for cropping, size limits, attribution, PCK and relative errors; 0 when none is
    labelled."""
    points = keypoints[keypoints[:, 2] > 0, :2]
    if len(points) == 0:
        return 0.0
    return float((points.max(0) - points.min(0)).max())
