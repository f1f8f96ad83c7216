"""Stage 1 of "Giving a Hand to Diffusion Models" (Pelykh, Mercanoglu Sincan, Bowden 2024):
a pose-conditioned UNet that generates a hand image and its segmentation mask together."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules.components import ComponentsConfig
from lightning_modules.diffusion_module import EMAConfig, OptimizerConfig
from lightning_modules.pose_conditioned import LATENT_CHANNELS, PoseConditionedDiffusion
from lightning_modules.sampling import SamplerConfig
from lightning_modules.unet_surgery import widen_conv_out


def mask_loss(mask_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_mask = mean((M - m_theta)^2) with m_theta = sigmoid(logit): the mask term of the
    multi-task objective L = L_LDM + lambda * L_mask (Pelykh et al. 2024, Sec. III).

    ``mask_logits`` and ``mask`` are ``[B, 1, h, w]`` at latent resolution, ``mask`` in [0, 1].
    """
    return (mask.float() - torch.sigmoid(mask_logits.float())).pow(2).mean()


class HandGenerator(PoseConditionedDiffusion):
    """Multi-task hand generator.

    The UNet's ``conv_out`` is widened from 4 to 5 channels: 4 for the diffusion output,
    1 for a hand-mask logit at latent resolution. Loss: ``L_LDM + mask_loss_weight * L_mask``
    (``mask_loss_weight = 0`` turns the multi-task head off). The pose enters through the
    ``conditioning`` piece (``concat``: VAE-encoded skeleton concatenated to the latent;
    ``controlnet``: a ControlNet on the skeleton image, trained with the UNet).
    """

    def __init__(
        self,
        components: ComponentsConfig | dict,
        conditioning: Literal["concat", "controlnet"] = "concat",
        mask_loss_weight: float = 1.0,
        caption_dropout: float = 0.1,
        pose_dropout: float = 0.0,
        conditioning_scale: float = 1.0,
        optimizer: OptimizerConfig | dict | None = None,
        sampler: SamplerConfig | dict | None = None,
        ema: EMAConfig | dict | None = None,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        perceptual: dict | None = None,
    ):
        super().__init__(
            components=components,
            conditioning=conditioning,
            conditioning_scale=conditioning_scale,
            caption_dropout=caption_dropout,
            pose_dropout=pose_dropout,
            optimizer=optimizer,
            sampler=sampler,
            ema=ema,
            snr_gamma=snr_gamma,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
            channels_last=channels_last,
            perceptual=perceptual,
        )
        self.mask_loss_weight = mask_loss_weight
        widen_conv_out(self.unet, LATENT_CHANNELS + 1)

    def forward(self, noisy_latents, timesteps, text_embeddings, pose):
        """Returns the diffusion output ``[B, 4, h, w]`` and mask logits ``[B, 1, h, w]``."""
        out = self.unet_output(noisy_latents, timesteps, text_embeddings, pose)
        return out[:, :LATENT_CHANNELS], out[:, LATENT_CHANNELS:]

    def loss_terms(self, batch, output, latents, noise, timesteps, generator=None):
        denoise_loss = self.denoising_loss(output[:, :LATENT_CHANNELS], latents, noise, timesteps)
        target_mask = batch.get("mask_latent")
        if target_mask is None:
            target_mask = F.interpolate(batch["mask"].float(), size=latents.shape[-2:], mode="area")
        m_loss = mask_loss(output[:, LATENT_CHANNELS:], target_mask)
        return {
            "loss": denoise_loss + self.mask_loss_weight * m_loss,
            "loss_denoise": denoise_loss,
            "loss_mask": m_loss,
        }

    def sample(self, pose_images: torch.Tensor, prompts: list[str], **kwargs):
        """Generate hands for skeletons ``[B, 3, H, W]`` in [0, 1] and their captions.

        Returns images ``[B, 3, H, W]`` and masks ``[B, 1, H, W]``, both in [0, 1]; the mask is
        the head's prediction at the last denoising step, upsampled. Keyword arguments as
        :meth:`~lightning_modules.pose_conditioned.PoseConditionedDiffusion.generate`.
        """
        images, output = self.generate(pose_images, prompts, **kwargs)
        masks = F.interpolate(
            torch.sigmoid(output[:, LATENT_CHANNELS:].float()),
            size=images.shape[-2:],
            mode="bilinear",
        )
        return images, masks

    def log_images(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Grid columns: skeleton | sample | predicted mask | real crop."""
        images, masks = self.sample(batch["pose_image"], batch["caption"], generator=generator)
        return {
            "skeleton": batch["pose_image"],
            "sample": images,
            "mask": masks,
            "real": (batch["image"] + 1) / 2,
        }
