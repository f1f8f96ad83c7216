"""Per-keypoint OKS sigmas (the falloff constants of COCO's object keypoint similarity)."""

from __future__ import annotations

import numpy as np

# COCO-17 body, from the COCO keypoint evaluation (pycocotools' Params.kpt_oks_sigmas).
COCO_BODY_SIGMAS = (
    np.array(
        [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87,
         0.87, 0.89, 0.89]
    )
    / 10.0
)  # fmt: skip

# 21-point hand (wrist, then thumb..pinky base to tip), from COCO-WholeBody's hand annotations
# (Jin et al. 2020; xtcocotools' `sigmas_lefthand` / `sigmas_righthand`, the same values).
HAND_SIGMAS = np.array(
    [0.029, 0.022, 0.035, 0.037, 0.047, 0.026, 0.025, 0.024, 0.035, 0.018, 0.024, 0.022,
     0.026, 0.017, 0.021, 0.021, 0.032, 0.020, 0.019, 0.022, 0.031]
)  # fmt: skip

SIGMAS = {"body": COCO_BODY_SIGMAS, "hand": HAND_SIGMAS}
