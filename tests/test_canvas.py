"""Hand alignment and pasting: the similarity fit, where the hand lands, and an antialiased
downscale."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.canvas import align_hand, paste_hands


def _hand(rng):
    kp = np.zeros((21, 3))
    kp[:, :2] = rng.uniform(10, 54, (21, 2))
    kp[:, 2] = 2
    return kp


def test_alignment_recovers_a_similarity_transform():
    rng = np.random.default_rng(0)
    crop = _hand(rng)
    angle, scale, t = 0.3, 1.7, np.array([40.0, -12.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    body = crop.copy()
    body[:, :2] = scale * crop[:, :2] @ rot.T + t
    alignment = align_hand(crop, body)
    np.testing.assert_allclose(alignment[:2, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(alignment[:2, 2], t, atol=1e-9)


def test_alignment_needs_two_shared_keypoints():
    crop = _hand(np.random.default_rng(1))
    unlabelled = crop.copy()
    unlabelled[:, 2] = 0
    with pytest.raises(ValueError, match="two keypoints"):
        align_hand(crop, unlabelled)


def test_pasted_hand_lands_on_its_keypoints():
    # a 64 px crop with a white square on the mask; place it at 2x scale, shifted
    image = np.zeros((64, 64, 3))
    mask = np.zeros((64, 64))
    image[20:30, 20:30] = 1.0
    mask[20:30, 20:30] = 1.0
    crop = np.array([[20, 20, 2], [30, 20, 2], [30, 30, 2], [20, 30, 2.0]])
    body = crop.copy()
    body[:, :2] = crop[:, :2] * 2 + [100, 50]
    crop21 = np.zeros((21, 3))
    body21 = np.zeros((21, 3))
    crop21[:4], body21[:4] = crop, body
    alignment = align_hand(crop21, body21)
    canvas, known = paste_hands((256, 200), [(image, mask, alignment)])
    assert canvas.shape == (200, 256, 3) and known.shape == (200, 256)
    ys, xs = np.nonzero(known)
    # the square [20, 30) maps to [140, 160) x [90, 110) in corner coordinates
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (140, 159, 90, 109)
    # bilinear resampling softens only the one-pixel border
    assert canvas[92:108, 142:158].min() == pytest.approx(1.0)
    assert canvas[known > 0].min() > 0.5 and canvas[known == 0].max() == 0


def _square_alignment(scale: float, offset: tuple[float, float]):
    crop = np.zeros((21, 3))
    crop[:4] = [[0, 0, 2], [64, 0, 2], [64, 64, 2], [0, 64, 2]]
    body = crop.copy()
    body[:4, :2] = crop[:4, :2] * scale + offset
    return align_hand(crop, body)


def test_a_shrunk_hand_is_area_averaged_not_aliased():
    """A 64 px one-pixel checkerboard pasted 8x smaller must come out as its mean (0.5): a
    bilinear warp alone samples a few source pixels and keeps the checkerboard's extremes."""
    image = np.repeat((np.indices((64, 64)).sum(0) % 2)[..., None], 3, -1).astype(float)
    mask = np.ones((64, 64))
    # offset so that an unfiltered bilinear warp samples source pixel centres: it would read one
    # parity of the checkerboard only (all 0) instead of the mean
    alignment = _square_alignment(1 / 8, (20.0625, 20.0625))
    canvas, known = paste_hands((64, 64), [(image, mask, alignment)])
    assert known[20:28, 20:28].all() and known.sum() == 64
    np.testing.assert_allclose(canvas[21:28, 21:28], 0.5, atol=1e-3)  # inside the border


def test_an_enlarged_hand_is_warped_without_prefilter():
    image = np.zeros((64, 64, 3))
    image[:, 32:] = 1.0
    canvas, _ = paste_hands((200, 200), [(image, np.ones((64, 64)), _square_alignment(2, (0, 0)))])
    assert canvas[10:100, :60].max() == 0 and canvas[10:100, 68:120].min() == pytest.approx(1.0)
