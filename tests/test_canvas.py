"""Hand alignment and pasting: the similarity fit, its error, and where the hand lands."""

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
    assert alignment.rms_error < 1e-9
    np.testing.assert_allclose(alignment.matrix[:2, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(alignment.matrix[:2, 2], t, atol=1e-9)


def test_alignment_error_is_the_rms_residual():
    rng = np.random.default_rng(1)
    crop = _hand(rng)
    body = crop.copy()
    body[:, :2] += rng.normal(0, 2.0, (21, 2))
    alignment = align_hand(crop, body)
    assert 0.5 < alignment.rms_error < 3.0
    unlabelled = body.copy()
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
