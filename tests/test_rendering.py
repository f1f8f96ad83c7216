"""Body skeleton layouts: HumanSD's released renderer reproduced pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.rendering import HUMANSD_COLORS, HUMANSD_LIMBS, draw_body_skeleton


def test_humansd_palette_is_seaborn_hls_16():
    # seaborn's hls palette starts at hue 0.01, lightness 0.6, saturation 0.65: its first colour
    # is #db5f57 when rounded; HumanSD truncates int(255 * c): (219.3, 94.7, 86.7) -> (219, 94, 86)
    assert HUMANSD_COLORS[0] == (219, 94, 86)


def test_humansd_layout_truncates_and_draws_discs_at_both_ends():
    body = np.zeros((17, 3))
    body[5] = [20.9, 30.9, 2]  # left shoulder -> drawn at (20, 30)
    body[7] = [40.2, 30.2, 2]  # left elbow -> (40, 30); limb (5, 7) is number 6
    body[9] = [60.0, 60.0, 0.01]  # left wrist scored below 0.02: limb (7, 9) not drawn
    canvas = draw_body_skeleton(np.zeros((64, 64, 3), np.uint8), body, 10, 99, "humansd16")
    colour = HUMANSD_COLORS[HUMANSD_LIMBS.index((5, 7))]
    assert tuple(canvas[30, 30]) == colour  # on the line
    assert tuple(canvas[30, 15]) == colour and canvas[30, 14].max() == 0  # disc of radius 5
    assert tuple(canvas[30, 45]) == colour and canvas[30, 46].max() == 0
    assert tuple(canvas[25, 20]) == colour and canvas[24, 20].max() == 0
    colours = {tuple(p) for p in canvas.reshape(-1, 3)}
    assert colours == {(0, 0, 0), colour}  # one limb, no separate joint markers, no AA


@pytest.mark.parametrize("layout", ["openpose18", "coco17"])
def test_other_layouts_still_draw(layout):
    body = np.zeros((17, 3))
    body[5], body[7] = [20, 30, 2], [40, 30, 2]
    canvas = draw_body_skeleton(np.zeros((64, 64, 3), np.uint8), body, 2, 2, layout)
    assert canvas[30, 30].max() > 0
