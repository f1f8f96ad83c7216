"""Sequential mask expansion: how much of the image each step blends, the schedule of a cell at
a known distance from the hand, the latent grid, the blend step and the pixel paste-back."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import DDIMScheduler

from lightning_modules.blending import (
    BlendConfig,
    LatentBlender,
    mask_schedule,
    paste_back,
    to_latent_grid,
)
from lightning_modules.components import SD_SCHEDULER


def _two_hands(size: int = 512, hand: int = 48) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., 200 : 200 + hand, 100 : 100 + hand] = 1
    mask[..., 220 : 220 + hand, 360 : 360 + hand] = 1
    return mask


@pytest.mark.parametrize(
    "config",
    [BlendConfig(radius=1.0, radius_unit="hand"), BlendConfig(radius=48.0, radius_unit="px")],
)
def test_first_step_leaves_most_of_the_image_free(config):
    """Two 48 px hands at 512 px, 50 steps: the first mask is each hand grown by a 48 px disc,
    at most 2 x (48 + 2 x 48)^2 px = 15.8 % of the image (less: the corners are round). The
    old latent-space schedule (a 3x3 dilation per step) blended 100 % here."""
    masks = mask_schedule(_two_hands(), 50, (64, 64), config)
    fractions = [float(m.mean()) for m in masks]
    disc_area = 2 * (48 * 48 + 4 * 48 * 48 + torch.pi * 48**2) / 512**2  # square + sides + corners
    assert fractions[0] == pytest.approx(disc_area, abs=0.01)
    assert fractions[0] < 0.16
    for earlier, later in itertools.pairwise(masks):
        assert (later <= earlier).all()  # the free region only grows
    # the last mask is the hand's cells: each hand is 6 x 5 whole cells plus half-covered
    # ones, which stay free (rows 200-248 x cols 100-148, rows 220-268 x cols 360-408)
    assert torch.equal(masks[-1], to_latent_grid(_two_hands(), (64, 64)))
    assert masks[-1].sum() == 2 * 30


@pytest.mark.parametrize(
    "config",
    [BlendConfig(radius=32.0, radius_unit="px"), BlendConfig(radius=2.0, radius_unit="hand")],
)
def test_each_cell_is_blended_while_the_radius_reaches_it(config):
    """A 16 px hand covering latent cells 7-8 of a 128 px image; radius 32 px over 5 steps is
    32, 24, 16, 8, 0 px. Cell column 9 (pixels 72-80, 1-8 px from the hand) is blended while the
    radius is >= 8 (4 steps), column 10 while >= 16 (3), column 11 (2), column 12 (1), 13 never."""
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 56:72, 56:72] = 1
    masks = mask_schedule(mask, 5, (16, 16), config)
    steps_blended = torch.stack(masks).sum(0)[0, 0]
    assert steps_blended[7, 7:14].tolist() == [5, 5, 4, 3, 2, 1, 0]
    assert steps_blended[7, 2:7].tolist() == [0, 1, 2, 3, 4]  # the same to the left


def test_radius_in_hand_units_scales_with_each_hand():
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 40:56, 40:56] = 1  # 16 px hand
    mask[..., 150:214, 150:214] = 1  # 64 px hand
    (first, *_) = mask_schedule(mask, 3, (256, 256), BlendConfig(radius=0.5, known_fraction=0))
    # the small hand grows by 8 px, the large one by 32 px
    assert first[0, 0, 47, 40 - 8] == 1 and first[0, 0, 47, 40 - 10] == 0
    assert first[0, 0, 180, 150 - 32] == 1 and first[0, 0, 180, 150 - 34] == 0


def test_a_latent_cell_is_known_only_when_mostly_hand():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 9, 17] = 1  # one pixel of cell (1, 2)
    mask[..., 16:24, 24:29] = 1  # 5 of 8 columns of cell (2, 3)
    grid = to_latent_grid(mask, (8, 8))
    assert grid.sum() == 1 and grid[0, 0, 2, 3] == 1


def test_fixed_and_none_modes():
    mask = _two_hands(128, 16)
    exact = to_latent_grid(mask, (16, 16))
    assert all(
        torch.equal(m, exact) for m in mask_schedule(mask, 5, (16, 16), BlendConfig("fixed"))
    )
    assert all(m.sum() == 0 for m in mask_schedule(mask, 5, (16, 16), BlendConfig("none")))


def _scheduler(steps):
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def test_blend_step_follows_the_formula():
    scheduler = _scheduler(10)
    canvas, latents = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    mask = _two_hands(128, 16)
    g = torch.Generator().manual_seed(0)
    blender = LatentBlender(scheduler, canvas, mask, BlendConfig(mode="fixed"), generator=g)
    out = blender(latents, 3)
    noise = torch.randn(canvas.shape, generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[4]
    abar = scheduler.alphas_cumprod[t]
    noised = abar.sqrt() * canvas + (1 - abar).sqrt() * noise
    m = to_latent_grid(mask, (16, 16))
    torch.testing.assert_close(out, m * noised + (1 - m) * latents)
    # the last step blends the clean canvas
    last = blender(latents, 9)
    torch.testing.assert_close(last, m * canvas + (1 - m) * latents)
    none = LatentBlender(scheduler, canvas, mask, BlendConfig(mode="none"))
    assert torch.equal(none(latents, 3), latents)


def test_paste_back_ramps_inside_the_hand():
    images, canvases = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    hard = paste_back(images, canvases, mask, feather=0)
    assert torch.equal(hard, mask.expand(-1, 3, -1, -1))
    soft = paste_back(images, canvases, mask, feather=4)
    # alpha = (distance to the nearest pixel outside) / 4: 1/4 on the border row, 2/4 one in
    row = soft[0, 0, 16, 6:14].tolist()
    assert row == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1, 1, 1], abs=1e-3)
    assert soft[..., :8, :].abs().max() == 0
