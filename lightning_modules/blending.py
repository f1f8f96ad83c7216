"""Latent blending of a known region into the reverse process (Giving a Hand, Sec. III-D).

After every denoising step the latent inside a mask ``m_t`` is replaced by the canvas latent
noised to the level the latent is now at, and keeps the model's prediction outside:

    z_t <- m_t * q(z_canvas, t) + (1 - m_t) * z_t

``sequential`` (the paper's "sequential mask expansion": "we gradually dilate the input hand
mask for T iterations [...] and then use the expanded masks as m_latent in (11) starting from
the largest and arriving at the original at step T"): the *pixel* hand mask is dilated by a
disc whose radius shrinks linearly from ``radius`` at the first step to 0 at the last, and each
step's mask is then reduced to the latent grid. ``radius_unit="hand"`` measures the radius in
hand sizes (the longest side of each connected hand region's bounding box), so a small hand
gets a proportionally small halo; ``"px"`` in image pixels.

Why pixels and a bounded radius: dilating the latent mask once per step (3x3 cells, 8 px at
SD's scale) grows a 50-step schedule's first mask by 49 cells = 392 px, which at 512 px covers
the whole image for the first ~15 steps, so the outpainter's early (layout-deciding) steps were
overwritten by the grey canvas. With the default (one hand size) two 48-px hands blend about
14 % of a 512 px image at the first step.

A latent cell is blended when more than ``known_fraction`` of its pixels are in the mask (not
when any is): a cell that is mostly canvas background would otherwise write the grey fringe
in at the last step, where nothing repaints it. ``fixed``: the hand mask at every step (plain
latent blending, the paper's ablation baseline). ``none``: no blending.

``paste_back_feather`` (pixels; ``None`` = off) pastes the stage-1 hands back over the decoded
image, with an alpha that ramps from 0 on the mask's border to 1 at that depth inside it:
the VAE's round trip blurs small hands, which a pixel-space paste-back undoes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class BlendConfig:
    mode: Literal["sequential", "fixed", "none"] = "sequential"
    radius: float = 1.0  # dilation of the first step's mask
    radius_unit: Literal["hand", "px"] = "hand"  # hand sizes or image pixels
    known_fraction: float = 0.5  # a latent cell is blended above this fraction of mask pixels
    paste_back_feather: float | None = None  # px of alpha ramp inside the hands; None: off


def _distance_outside(region: np.ndarray) -> np.ndarray:
    """Euclidean distance (px) of every pixel to the nearest pixel of ``region`` (0 inside)."""
    return cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def expansion_distance(mask: torch.Tensor, radius: float, unit: str) -> torch.Tensor:
    """Pixel masks ``[B, 1, H, W]`` in [0, 1] -> normalised distances ``[B, 1, H, W]``: 0 inside
    the mask, ``d / R`` outside, with ``d`` the distance to a hand region and ``R`` that region's
    radius (``radius`` px, or ``radius`` x the region's longest bounding-box side); the minimum
    over regions. Pixels of an image without a hand get ``inf``. The mask after dilation by
    ``f x R`` is ``distance <= f``."""
    out = np.full(mask.shape, np.inf, np.float32)
    binary = (mask[:, 0] > 0.5).cpu().numpy()
    for b, image in enumerate(binary):
        if unit == "px":
            if image.any():
                out[b, 0] = _distance_outside(image) / max(radius, 1e-6)
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(image.astype(np.uint8), 8)
        for k in range(1, count):
            size = max(stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT])
            distance = _distance_outside(labels == k) / max(radius * size, 1e-6)
            np.minimum(out[b, 0], distance, out=out[b, 0])
    return torch.from_numpy(out).to(mask.device)


def to_latent_grid(mask: torch.Tensor, size: tuple[int, int], known_fraction: float = 0.5):
    """Pixel mask ``[B, 1, H, W]`` in {0, 1} -> binary latent mask ``[B, 1, h, w]``: a cell is
    in when more than ``known_fraction`` of its pixels are."""
    return (F.adaptive_avg_pool2d(mask.float(), size) > known_fraction).float()


def expansion_fractions(num_steps: int) -> list[float]:
    """Fraction of the full radius after each step: 1 at the first, linearly down to 0."""
    if num_steps == 1:
        return [0.0]
    return [(num_steps - 1 - i) / (num_steps - 1) for i in range(num_steps)]


def mask_schedule(
    mask: torch.Tensor, num_steps: int, latent_size: tuple[int, int], config: BlendConfig
) -> list[torch.Tensor]:
    """The latent mask ``[B, 1, h, w]`` applied after each of ``num_steps`` denoising steps,
    from the pixel hand mask ``[B, 1, H, W]``."""
    if config.mode == "none":
        return [torch.zeros(mask.shape[0], 1, *latent_size, device=mask.device)] * num_steps
    exact = to_latent_grid(mask > 0.5, latent_size, config.known_fraction)
    if config.mode == "fixed":
        return [exact] * num_steps
    distance = expansion_distance(mask, config.radius, config.radius_unit)
    return [
        to_latent_grid(distance <= f, latent_size, config.known_fraction) if f > 0 else exact
        for f in expansion_fractions(num_steps)
    ]


def paste_back(
    images: torch.Tensor, canvases: torch.Tensor, mask: torch.Tensor, feather: float
) -> torch.Tensor:
    """Composite ``canvases`` over ``images`` (both ``[B, 3, H, W]`` in [0, 1]) inside ``mask``
    ``[B, 1, H, W]``, alpha ramping linearly from 0 at the mask's border to 1 at ``feather`` px
    inside (``feather = 0``: a hard paste)."""
    binary = (mask[:, 0] > 0.5).cpu().numpy()
    alpha = np.zeros(binary.shape, np.float32)
    for b, region in enumerate(binary):
        if feather <= 0:
            alpha[b] = region
        elif region.any():
            # distance to the nearest pixel outside the hand, so the ramp stays inside it
            inside = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5)
            alpha[b] = np.clip(inside / feather, 0, 1)
    a = torch.from_numpy(alpha)[:, None].to(images)
    return a * canvases.to(images) + (1 - a) * images


class LatentBlender:
    """The ``after_step`` hook of :func:`lightning_modules.sampling.denoise` that blends
    ``canvas_latents`` ``[B, 4, h, w]`` into the latents inside the scheduled masks, built from
    the pixel hand mask ``[B, 1, H, W]``."""

    def __init__(
        self,
        scheduler,
        canvas_latents: torch.Tensor,
        mask: torch.Tensor,
        config: BlendConfig,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
            size = tuple(self.canvas.shape[-2:])
            self.masks = mask_schedule(self.mask, len(timesteps), size, self.config)
        m = self.masks[step].to(latents)
        if step + 1 < len(timesteps):
            # the latent now sits at the next timestep's noise level
            t = timesteps[step + 1].reshape(1)
            known = self.scheduler.add_noise(self.canvas, self.noise, t)
        else:
            known = self.canvas
        return m * known + (1 - m) * latents
