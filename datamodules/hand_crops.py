"""Square hand crops with their skeleton and mask, kept pixel-aligned through resize and flip."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from datamodules.rendering import hull_mask, render_hand_skeleton
from datamodules.schema import Sample


@dataclass
class HandCropConfig:
    resolution: int = 64
    margin: float = 0.25  # context on each side, as a fraction of the keypoints' extent
    min_visible_keypoints: int = 10
    min_crop_size: int = 16  # px of the source image: the smallest crop side
    # px of the source image: hands whose labelled keypoints span less are skipped (too_small)
    min_hand_size: float = 8.0
    line_width: int = 2
    joint_radius: int = 1
    hull_dilation: int = 2  # px at training resolution, for masks rasterised from keypoints
    flip_prob: float = 0.5
    # how the generator learns which hand it draws: the skeleton's palette (left hands in
    # datamodules.rendering's left-hand colours), a "left hand, " / "right hand, " caption
    # prefix (dropped with the caption under classifier-free guidance), or not at all
    side_cue: Literal["palette", "caption", "none"] = "palette"


def crop_box(keypoints: np.ndarray, margin: float, min_size: int) -> tuple[int, int, int]:
    """Square box ``(x0, y0, side)`` centred on the labelled keypoints' bounding box.

    ``side = max(w, h) * (1 + 2 * margin)``, at least ``min_size``; integer so that the crop
    is an exact translation. The box may extend past the image (padded with black).
    """
    points = keypoints[keypoints[:, 2] > 0, :2]
    lo, hi = points.min(0), points.max(0)
    side = max(int(np.ceil(max(hi - lo) * (1 + 2 * margin))), min_size)
    cx, cy = (lo + hi) / 2
    return int(np.floor(cx - side / 2)), int(np.floor(cy - side / 2)), side


def _swap_sides(caption: str) -> str:
    return re.sub(
        r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", caption
    )


def hand_condition(
    keypoints: np.ndarray, is_right: bool, caption: str, config: HandCropConfig
) -> tuple[np.ndarray, str]:
    """The generator's conditions for a hand: skeleton ``[R, R, 3]`` uint8 of ``keypoints``
    ``[21, 3]`` (crop pixels) and the caption, both carrying the side as ``config.side_cue``
    says. Training crops and the two-stage pipeline both condition through this."""
    side = "right" if is_right else "left"
    palette = side if config.side_cue == "palette" else None
    skeleton = render_hand_skeleton(
        keypoints, config.resolution, config.line_width, config.joint_radius, palette
    )
    if config.side_cue == "caption":
        caption = f"{side} hand, {caption}" if caption else f"{side} hand"
    return skeleton, caption


def hand_crop(
    sample: Sample,
    keypoints: np.ndarray,
    is_right: bool,
    config: HandCropConfig,
    rng: random.Random,
) -> dict:
    """One training example for the hand generator.

    Returns ``image`` ``[3, R, R]`` in [-1, 1], ``pose_image`` ``[3, R, R]`` in [0, 1] (skeleton),
    ``mask`` ``[1, R, R]`` in {0, 1}, ``mask_from_file`` (False: convex hull of the keypoints),
    ``keypoints`` ``[21, 3]`` at crop resolution, ``crop_scale`` (crop pixels per source
    pixel), ``is_right``, ``caption``, ``key``.
    """
    res = config.resolution
    x0, y0, side = crop_box(keypoints, config.margin, config.min_crop_size)
    box = (x0, y0, x0 + side, y0 + side)
    image = sample.image.crop(box).resize((res, res), Image.BICUBIC)
    points = keypoints.copy()
    points[:, :2] = (points[:, :2] - (x0, y0)) * (res / side)
    if sample.mask is not None:
        crop = Image.fromarray(sample.mask).crop(box).resize((res, res), Image.BILINEAR)
        mask = (np.asarray(crop) >= 128).astype(np.float32)
    else:
        mask = hull_mask(points, (res, res), config.hull_dilation).astype(np.float32) / 255
    caption = sample.caption
    pixels = np.asarray(image)
    if rng.random() < config.flip_prob:
        # A mirrored right hand is a left hand: flip the label and the words with it.
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
        points[:, 0] = res - points[:, 0]
        is_right = not is_right
        caption = _swap_sides(caption)
    # Rendered after the flip so that the skeleton is exactly the mirrored keypoints.
    skeleton, caption = hand_condition(points, is_right, caption, config)
    return {
        "image": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1,
        "crop_scale": res / side,  # crop pixels per source pixel
        "pose_image": torch.from_numpy(skeleton).permute(2, 0, 1).float() / 255,
        "mask": torch.from_numpy(mask.copy())[None],
        "mask_from_file": sample.mask is not None,
        "keypoints": torch.from_numpy(points).float(),
        "is_right": is_right,
        "caption": caption,
        "key": sample.key,
    }


def visible_hands(sample: Sample, config: HandCropConfig):
    """Yield ``(keypoints, is_right, person)`` for each hand with enough labelled keypoints."""
    for person in sample.people:
        for keypoints, is_right in ((person.left_hand, False), (person.right_hand, True)):
            if keypoints is not None and (keypoints[:, 2] > 0).sum() >= max(
                config.min_visible_keypoints, 2
            ):
                yield keypoints, is_right, person
