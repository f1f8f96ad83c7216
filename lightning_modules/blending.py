"""Latent blending of a known region into the reverse process (Giving a Hand, Sec. III-D).

After every denoising step the latent inside a mask ``m_t`` is replaced by the canvas latent
noised to the level the latent is now at, and keeps the model's prediction outside:

    z_t <- m_t * q(z_canvas, t) + (1 - m_t) * z_t

``sequential`` (the paper's "sequential mask expansion"): ``m_t`` starts as the hand mask
dilated ``max_dilations`` times (by default once per step) and shrinks by one dilation per
step to exactly the hand mask at the last step, so the outpainted region grows towards the
hands while the seams are still noisy. ``fixed``: the hand mask at every step (plain latent
blending, the paper's ablation baseline). ``none``: no blending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class BlendConfig:
    mode: Literal["sequential", "fixed", "none"] = "sequential"
    kernel_size: int = 3  # dilation structuring element (square), in latent pixels
    max_dilations: int | None = None  # dilations of the first mask; None: number of steps


def dilate(mask: torch.Tensor, kernel_size: int, times: int = 1) -> torch.Tensor:
    """Binary dilation of ``mask`` ``[B, 1, h, w]`` by a square kernel, ``times`` times."""
    for _ in range(times):
        mask = F.max_pool2d(mask, kernel_size, stride=1, padding=kernel_size // 2)
    return mask


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Image-resolution mask ``[B, 1, H, W]`` in [0, 1] -> binary latent mask ``[B, 1, h, w]``:
    a latent cell is known when any of its pixels is (max pooling), so the blended region
    covers the whole hand."""
    return (F.adaptive_max_pool2d(mask.float(), size) > 0.5).float()


def dilation_counts(num_steps: int, max_dilations: int | None) -> list[int]:
    """Dilations of the mask at each step: ``max_dilations`` at the first step, non-increasing,
    0 at the last step (evenly spaced when ``max_dilations != num_steps - 1``)."""
    top = num_steps - 1 if max_dilations is None else max_dilations
    if num_steps == 1:
        return [0]
    return [round(top * (num_steps - 1 - i) / (num_steps - 1)) for i in range(num_steps)]


def mask_schedule(mask: torch.Tensor, num_steps: int, config: BlendConfig) -> list[torch.Tensor]:
    """The mask applied after each of ``num_steps`` denoising steps."""
    if config.mode == "none":
        return [torch.zeros_like(mask)] * num_steps
    if config.mode == "fixed":
        return [mask] * num_steps
    counts = dilation_counts(num_steps, config.max_dilations)
    # dilating the previous (smaller) mask further is the same as dilating M more times
    by_count: dict[int, torch.Tensor] = {0: mask}
    for n in range(1, max(counts) + 1):
        by_count[n] = dilate(by_count[n - 1], config.kernel_size)
    return [by_count[n] for n in counts]


class LatentBlender:
    """The ``after_step`` hook of :func:`lightning_modules.sampling.denoise` that blends
    ``canvas_latents`` ``[B, 4, h, w]`` into the latents inside the scheduled masks."""

    def __init__(
        self,
        scheduler,
        canvas_latents: torch.Tensor,
        mask: torch.Tensor,
        config: BlendConfig,
        generator: torch.Generator | None = None,
    ):
        self.scheduler = scheduler
        self.canvas = canvas_latents
        self.config = config
        self.mask = mask
        self.noise = randn_tensor(
            canvas_latents.shape,
            generator=generator,
            device=canvas_latents.device,
            dtype=canvas_latents.dtype,
        )
        self.masks: list[torch.Tensor] | None = None

    def __call__(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        timesteps = self.scheduler.timesteps
        if self.masks is None:
            self.masks = mask_schedule(self.mask, len(timesteps), self.config)
        m = self.masks[step].to(latents)
        if self.config.mode == "none":
            return latents
        if step + 1 < len(timesteps):
            # the latent now sits at the next timestep's noise level
            t = timesteps[step + 1].reshape(1)
            known = self.scheduler.add_noise(self.canvas, self.noise, t)
        else:
            known = self.canvas
        return m * known + (1 - m) * latents
