"""Cropping, resizing, flipping and rendering keep image, keypoints, skeleton and mask aligned."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from datamodules.hand_crops import HandCropConfig, crop_box, hand_condition, hand_crop
from datamodules.rendering import (
    HAND_EDGE_COLORS,
    HAND_JOINT_COLOR,
    LEFT_HAND_EDGE_COLORS,
    LEFT_HAND_JOINT_COLOR,
    hull_mask,
)
from datamodules.schema import Person, Sample
from datamodules.synthetic import draw_person

MARK = (255, 0, 255)


def _marked_sample(with_mask: bool) -> tuple[Sample, np.ndarray]:
    """A 200x160 image with a 5x5 magenta square centred on every hand keypoint."""
    rng = np.random.default_rng(0)
    angles = np.linspace(-0.6, 0.6, 20)
    points = [(100.0, 90.0)] + [
        (100 + r * np.sin(a), 90 - r * np.cos(a))
        for a, r in zip(angles, np.tile([12, 20, 27, 33], 5), strict=True)
    ]
    keypoints = np.array([[x, y, 2] for x, y in points])
    pixels = rng.integers(0, 60, (160, 200, 3)).astype(np.uint8)
    for x, y, _ in keypoints:
        pixels[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3] = MARK
    mask = None
    if with_mask:
        mask = np.zeros((160, 200), np.uint8)
        mask[40:100, 60:140] = 255
    person = Person((0, 0, 200, 160), np.zeros((17, 3)), right_hand=keypoints)
    return Sample(
        "k", "u", Image.fromarray(pixels), "raise the left hand", {}, [person], mask
    ), keypoints


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_crop_keeps_keypoints_on_their_pixels(flip, with_mask):
    sample, keypoints = _marked_sample(with_mask)
    config = HandCropConfig(
        resolution=96, margin=0.3, flip_prob=1.0 if flip else 0.0, line_width=1, joint_radius=1
    )
    out = hand_crop(sample, keypoints, True, config, random.Random(0))
    image = ((out["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    skeleton = (out["pose_image"].permute(1, 2, 0).numpy() * 255).round()
    points = out["keypoints"].numpy()
    for x, y, _ in points:
        px, py = int(x), int(y)  # the pixel containing the keypoint (corner convention)
        assert np.abs(image[py, px] - MARK).max() < 60, (x, y, image[py, px])
        assert skeleton[py - 1 : py + 2, px - 1 : px + 2].max() > 100
        assert out["mask"][0, py, px] == 1
    assert out["is_right"] is (not flip)
    assert out["caption"] == ("raise the right hand" if flip else "raise the left hand")
    assert out["mask_from_file"] is with_mask
    # nothing drawn far from the hand
    far = np.ones(skeleton.shape[:2], bool)
    for x, y, _ in points:
        far[max(0, int(y) - 12) : int(y) + 12, max(0, int(x) - 12) : int(x) + 12] = False
    assert skeleton[far].max() == 0


def test_flip_mirrors_image_mask_and_skeleton():
    sample, keypoints = _marked_sample(with_mask=False)
    kw = dict(resolution=64, line_width=2, joint_radius=0, side_cue="none")
    plain = hand_crop(
        sample, keypoints, False, HandCropConfig(flip_prob=0.0, **kw), random.Random(0)
    )
    flipped = hand_crop(
        sample, keypoints, False, HandCropConfig(flip_prob=1.0, **kw), random.Random(0)
    )
    assert (flipped["image"] == plain["image"].flip(-1)).all()
    assert (flipped["mask"] == plain["mask"].flip(-1)).all()
    np.testing.assert_allclose(flipped["keypoints"][:, 0], 64 - plain["keypoints"][:, 0], atol=1e-5)
    # rendered from mirrored keypoints: equal to the mirrored rendering up to anti-aliasing
    diff = (flipped["pose_image"] - plain["pose_image"].flip(-1)).abs()
    assert diff.mean() < 0.01 and (diff > 0.5).float().mean() < 0.01


def _colours(pose_image) -> set:
    return {
        tuple(p) for p in (pose_image.permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()
    }


def test_side_cue_palette_follows_the_hand_through_a_flip():
    """A left hand is drawn in the left palette; flipped, it is a right hand and is drawn in
    OpenPose's palette, so the generator always sees which side it draws."""
    sample, keypoints = _marked_sample(with_mask=False)
    kw = dict(resolution=128, line_width=3, joint_radius=2)
    left = hand_crop(sample, keypoints, False, HandCropConfig(flip_prob=0, **kw), random.Random(0))
    flipped = hand_crop(
        sample, keypoints, False, HandCropConfig(flip_prob=1, **kw), random.Random(0)
    )
    assert not left["is_right"] and flipped["is_right"]
    left_colours, right_colours = _colours(left["pose_image"]), _colours(flipped["pose_image"])
    assert LEFT_HAND_JOINT_COLOR in left_colours and HAND_JOINT_COLOR not in left_colours
    assert sum(c in left_colours for c in LEFT_HAND_EDGE_COLORS) >= 15
    assert HAND_JOINT_COLOR in right_colours and LEFT_HAND_JOINT_COLOR not in right_colours
    assert not set(LEFT_HAND_EDGE_COLORS) & set(HAND_EDGE_COLORS)


def test_side_cue_caption_prefixes_the_side():
    sample, keypoints = _marked_sample(with_mask=False)
    config = HandCropConfig(resolution=64, flip_prob=1, side_cue="caption")
    out = hand_crop(sample, keypoints, False, config, random.Random(0))
    assert out["caption"].startswith("right hand, ")  # a flipped left hand
    skeleton, caption = hand_condition(out["keypoints"].numpy(), False, "", config)
    assert caption == "left hand"
    # caption mode draws both sides in one palette
    plain, _ = hand_condition(out["keypoints"].numpy(), True, "", config)
    assert (skeleton == plain).all()


def test_crop_box_is_square_centred_with_margin():
    keypoints = np.array([[10, 20, 2], [50, 40, 2], [0, 0, 0]], float)
    x0, y0, side = crop_box(keypoints, margin=0.25, min_size=8)
    assert side == 60  # 40 * 1.5
    assert (x0 + side / 2, y0 + side / 2) == (30, 30)
    assert crop_box(keypoints, 0.25, min_size=100)[2] == 100


def test_skeleton_uses_openpose_hand_colours():
    sample, keypoints = _marked_sample(with_mask=False)
    out = hand_crop(
        sample,
        keypoints,
        True,
        HandCropConfig(resolution=128, flip_prob=0, line_width=3, joint_radius=2),
        random.Random(0),
    )
    pixels = {
        tuple(p)
        for p in (out["pose_image"].permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()
    }
    assert HAND_JOINT_COLOR in pixels
    assert sum(c in pixels for c in HAND_EDGE_COLORS) >= 15
    assert HAND_EDGE_COLORS[0] == (255, 0, 0)  # edge 0 at hue 0, as OpenPose


def test_hull_mask_covers_the_keypoints():
    keypoints = np.array([[10.5, 10.5, 2], [30.5, 12.5, 2], [20.5, 30.5, 2], [0, 0, 0]])
    mask = hull_mask(keypoints, (40, 40))
    for x, y, _ in keypoints[:3]:
        assert mask[int(y), int(x)] == 255
    assert mask[20, 20] == 255 and mask[2, 2] == 0 and mask[35, 35] == 0
    assert hull_mask(keypoints, (40, 40), dilation=3).sum() > mask.sum()


def test_synthetic_people_have_keypoints_inside_their_hand_masks():
    rng = np.random.default_rng(0)
    inside = total = 0
    for _ in range(10):
        _, mask, record = draw_person(rng, 256)
        for hand in ("left_hand", "right_hand"):
            points = record["people"][0][hand]
            if points is None:
                continue
            for x, y, v in points:
                if v > 0:
                    total += 1
                    inside += mask[min(int(y), 255), min(int(x), 255)] > 0
    assert total > 200 and inside / total > 0.97
