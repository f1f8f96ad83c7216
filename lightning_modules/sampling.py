"""The denoising loop every method samples with, and its schedulers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}


@dataclass
class SamplerConfig:
    """Sampling defaults of a method (each can be overridden per ``sample`` call)."""

    scheduler: Literal["ddim", "dpm++", "euler", "ddpm"] = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0  # DDIM only
    negative_prompt: str = ""
    # pose-conditioned methods trained with pose_dropout > 0: a separate guidance scale for the
    # pose (:func:`pose_and_text_guidance`); None: the pose is kept in both guidance branches
    pose_guidance_scale: float | None = None


def pose_and_text_guidance(
    neither: torch.Tensor,
    pose_only: torch.Tensor,
    both: torch.Tensor,
    pose_scale: float,
    text_scale: float,
) -> torch.Tensor:
    """Guidance over two conditions (Brooks et al. 2023, InstructPix2Pix, eq. 3, with the
    pose as the first condition): ``e(0, 0) + s_p (e(p, 0) - e(0, 0)) + s_t (e(p, c) - e(p, 0))``
    from the outputs without pose or caption, with the pose only, and with both. ``s_p = 1``
    is ordinary text guidance with the pose in both branches."""
    return neither + pose_scale * (pose_only - neither) + text_scale * (both - pose_only)


def make_scheduler(name: str, train_config: dict) -> SchedulerMixin:
    """A sampling scheduler sharing the training schedule's betas and prediction type."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r}: choose one of {sorted(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    return cls.from_config(train_config, **extra)


def denoise(
    scheduler: SchedulerMixin,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    progress: bool = False,
    after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the reverse process from noise ``latents`` ``[B, C, h, w]`` (unit variance).

    ``predict(x, t)`` returns the model output for ``x``; with guidance (``guidance_scale > 1``)
    ``x`` is ``[2B, C, h, w]``, the unconditional half first, and the output is combined as
    ``u + s * (c - u)`` (Ho & Salimans 2022, eq. 6). ``after_step(latents, i)``, if given,
    may rewrite the latents after step ``i`` (latent blending).
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    guided = guidance_scale > 1.0
    step_kwargs = {}
    params = inspect.signature(scheduler.step).parameters
    if "eta" in params:
        step_kwargs["eta"] = eta
    if "generator" in params:
        step_kwargs["generator"] = generator
    steps = tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)
    for i, t in enumerate(steps):
        x = torch.cat([latents, latents]) if guided else latents
        x = scheduler.scale_model_input(x, t)
        output = predict(x, t)
        if guided:
            uncond, cond = output.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample
        if after_step is not None:
            latents = after_step(latents, i)
    return latents
