"""How a pose image enters the UNet. Swappable: a method names one in its config."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from lightning_modules.components import resolve_pretrained
from lightning_modules.unet_surgery import widen_conv_in


class PoseConditioning(nn.Module, ABC):
    """Interface of a pose-conditioning piece.

    ``attach`` adapts the UNet once; ``encode`` turns a pose image ``[B, 3, H, W]`` in [0, 1]
    into the condition the UNet call takes; ``null`` is the condition classifier-free guidance
    drops to; ``predict`` runs the UNet on noisy latents ``[B, 4, H/8, W/8]``.
    """

    @abstractmethod
    def attach(self, unet: UNet2DConditionModel) -> None:
        """Adapt ``unet`` in place for this kind of condition."""

    @abstractmethod
    def encode(
        self, pose_image: torch.Tensor, vae_encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The condition the UNet call takes, from a pose image in [0, 1]."""

    @abstractmethod
    def null(self, condition: torch.Tensor) -> torch.Tensor:
        """The condition that stands for "no pose" (classifier-free guidance)."""

    @abstractmethod
    def predict(
        self,
        unet: UNet2DConditionModel,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        condition: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet's raw output for ``noisy_latents`` under ``condition``."""


class ConcatPoseConditioning(PoseConditioning):
    """The pose image, VAE-encoded, concatenated to the noisy latent (HumanSD; Giving a Hand's
    stage 1): ``conv_in`` grows from 4 to 8 input channels, the new weights zero-initialised.

    The pose latent is the VAE posterior's mode (not a sample) times the scaling factor: the
    condition should not be noisy. A dropped pose (CFG) is the zero latent.
    """

    def attach(self, unet: UNet2DConditionModel) -> None:
        latent = unet.conv_in.in_channels
        if latent == 4:
            widen_conv_in(unet, 8)
        elif latent != 8:
            raise ValueError(f"concat conditioning needs a 4- or 8-channel UNet, got {latent}")

    def encode(self, pose_image, vae_encode):
        return vae_encode(pose_image * 2 - 1)

    def null(self, condition):
        return torch.zeros_like(condition)

    def predict(self, unet, noisy_latents, timesteps, text_embeddings, condition):
        x = torch.cat([noisy_latents, condition.to(noisy_latents.dtype)], dim=1)
        return unet(x, timesteps, encoder_hidden_states=text_embeddings).sample


class ControlNetPoseConditioning(PoseConditioning):
    """A ControlNet (Zhang et al. 2023) on the pose image in pixel space, initialised from the
    UNet's encoder (``ControlNetModel.from_unet``) or loaded with ``from_pretrained``; its zero
    convolutions make the UNet's prediction start out unchanged.

    Each network reads the leading channels of the latent input it was built for: a ControlNet
    widened to ``in_channels`` (e.g. 9: latent, inpainting mask, canvas latent) beside a
    4-channel UNet sees the canvas while the UNet does not. A dropped pose is a black image.
    """

    def __init__(
        self,
        conditioning_scale: float = 1.0,
        pretrained: str | None = None,
        in_channels: int | None = None,
    ):
        super().__init__()
        self.conditioning_scale = conditioning_scale
        self.pretrained = pretrained
        self.in_channels = in_channels
        self.controlnet: ControlNetModel | None = None

    def attach(self, unet: UNet2DConditionModel) -> None:
        if self.pretrained:
            self.controlnet = ControlNetModel.from_pretrained(
                resolve_pretrained(self.pretrained, "controlnet pretrained")
            ).train()  # from_pretrained returns eval mode; a frozen one is set to eval by freeze
        else:
            self.controlnet = ControlNetModel.from_unet(unet)
        if self.in_channels:
            widen_conv_in(self.controlnet, self.in_channels)

    @contextlib.contextmanager
    def scaled(self, scale: float | None) -> Iterator[None]:
        """Run with another conditioning scale (HandRefiner's control strength); ``None``
        keeps the configured one."""
        kept = self.conditioning_scale
        self.conditioning_scale = kept if scale is None else scale
        try:
            yield
        finally:
            self.conditioning_scale = kept

    def encode(self, pose_image, vae_encode):
        return pose_image

    def null(self, condition):
        return torch.zeros_like(condition)

    def predict(self, unet, noisy_latents, timesteps, text_embeddings, condition):
        down, mid = self.controlnet(
            noisy_latents[:, : self.controlnet.config.in_channels],
            timesteps,
            encoder_hidden_states=text_embeddings,
            controlnet_cond=condition.to(noisy_latents.dtype),
            conditioning_scale=self.conditioning_scale,
            return_dict=False,
        )
        return unet(
            noisy_latents[:, : unet.config.in_channels],
            timesteps,
            encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample


class NoPoseConditioning(PoseConditioning):
    """No pose at all: the plain text-to-image SD baseline (the "no pose" floor)."""

    def attach(self, unet: UNet2DConditionModel) -> None:
        """Nothing to adapt."""

    def encode(self, pose_image, vae_encode):
        return pose_image.new_zeros(pose_image.shape[0], 0)

    def null(self, condition):
        return condition

    def predict(self, unet, noisy_latents, timesteps, text_embeddings, condition):
        return unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample


CONDITIONINGS: dict[str, type[PoseConditioning]] = {
    "concat": ConcatPoseConditioning,
    "controlnet": ControlNetPoseConditioning,
    "none": NoPoseConditioning,
}


def build_conditioning(name: str, **kwargs) -> PoseConditioning:
    if name not in CONDITIONINGS:
        raise ValueError(f"conditioning={name!r}: choose one of {sorted(CONDITIONINGS)}")
    return CONDITIONINGS[name](**kwargs)
