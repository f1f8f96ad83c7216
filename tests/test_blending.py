"""Sequential mask expansion: the schedule's shape, the last mask, and the blend itself."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import DDIMScheduler

from lightning_modules.blending import (
    BlendConfig,
    LatentBlender,
    dilate,
    dilation_counts,
    latent_mask,
    mask_schedule,
)
from lightning_modules.components import SD_SCHEDULER
from lightning_modules.sampling import denoise


def _hand_mask():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6:9, 7:10] = 1
    return mask


def test_dilation_by_a_3x3_kernel_grows_one_cell_per_side():
    grown = dilate(_hand_mask(), 3)
    assert grown.sum() == 5 * 5
    assert dilate(_hand_mask(), 3, times=2).sum() == 7 * 7


@pytest.mark.parametrize("steps, top", [(10, None), (50, None), (20, 5), (4, 12)])
def test_schedule_is_monotone_and_ends_on_the_hand_mask(steps, top):
    mask = _hand_mask()
    masks = mask_schedule(mask, steps, BlendConfig(max_dilations=top))
    assert len(masks) == steps
    for earlier, later in itertools.pairwise(masks):
        assert (later <= earlier).all()  # never grows: the outpainted region only expands
    assert torch.equal(masks[-1], mask)
    counts = dilation_counts(steps, top)
    assert counts[0] == (steps - 1 if top is None else top) and counts[-1] == 0
    assert torch.equal(masks[0], dilate(mask, 3, counts[0]))


def test_fixed_and_none_modes():
    mask = _hand_mask()
    assert all(torch.equal(m, mask) for m in mask_schedule(mask, 5, BlendConfig(mode="fixed")))
    assert all(m.sum() == 0 for m in mask_schedule(mask, 5, BlendConfig(mode="none")))


def test_latent_mask_keeps_any_touched_cell():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 9, 17] = 1  # one pixel in latent cell (1, 2)
    lat = latent_mask(mask, (8, 8))
    assert lat.sum() == 1 and lat[0, 0, 1, 2] == 1


def _scheduler(steps):
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def test_blend_step_follows_the_formula():
    scheduler = _scheduler(10)
    canvas, latents = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    mask = _hand_mask()
    g = torch.Generator().manual_seed(0)
    blender = LatentBlender(scheduler, canvas, mask, BlendConfig(mode="fixed"), generator=g)
    out = blender(latents, 3)
    noise = torch.randn(canvas.shape, generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[4]
    abar = scheduler.alphas_cumprod[t]
    noised = abar.sqrt() * canvas + (1 - abar).sqrt() * noise
    torch.testing.assert_close(out, mask * noised + (1 - mask) * latents)
    # the last step blends the clean canvas
    last = blender(latents, 9)
    torch.testing.assert_close(last, mask * canvas + (1 - mask) * latents)


@pytest.mark.parametrize("mode", ["sequential", "fixed"])
def test_known_region_is_reproduced(mode):
    """With the model predicting the true noise of the canvas ("perfect" inside the known
    region) and random noise outside, the result equals the canvas inside the hand mask."""
    steps = 8
    scheduler = _scheduler(steps)
    canvas = torch.randn(1, 4, 16, 16)
    mask = _hand_mask()
    blender = LatentBlender(
        scheduler, canvas, mask, BlendConfig(mode=mode), generator=torch.Generator().manual_seed(1)
    )

    def predict(x, t):
        abar = scheduler.alphas_cumprod[t]
        eps_true = (x - abar.sqrt() * canvas) / (1 - abar).sqrt()
        return mask * eps_true + (1 - mask) * torch.randn_like(x)

    out = denoise(scheduler, predict, torch.randn(1, 4, 16, 16), steps, 1.0, after_step=blender)
    torch.testing.assert_close(out * mask, canvas * mask)
    assert not torch.allclose(out * (1 - mask), canvas * (1 - mask))


def test_without_blending_the_known_region_is_not_enforced():
    steps = 4
    scheduler = _scheduler(steps)
    canvas, mask = torch.randn(1, 4, 16, 16), _hand_mask()
    blender = LatentBlender(scheduler, canvas, mask, BlendConfig(mode="none"))
    out = denoise(
        scheduler,
        lambda x, t: torch.zeros_like(x),
        torch.randn(1, 4, 16, 16),
        steps,
        1.0,
        after_step=blender,
    )
    assert not torch.allclose(out * mask, canvas * mask, atol=1e-2)
