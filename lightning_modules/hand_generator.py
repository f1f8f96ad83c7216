"""Stage 1 of "Giving a Hand to Diffusion Models" (Pelykh, Mercanoglu Sincan, Bowden 2024):
a pose-conditioned UNet that generates a hand image and its segmentation mask together."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from lightning_modules.components import ComponentsConfig
from lightning_modules.conditioning import build_conditioning
from lightning_modules.diffusion_module import EMAConfig, LatentDiffusionModule, OptimizerConfig
from lightning_modules.sampling import SamplerConfig, denoise
from lightning_modules.unet_surgery import widen_conv_out

LATENT_CHANNELS = 4


def mask_loss(mask_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_mask = mean((M - m_theta)^2) with m_theta = sigmoid(logit): the mask term of the
    multi-task objective L = L_LDM + lambda * L_mask (Pelykh et al. 2024, Sec. III).

    ``mask_logits`` and ``mask`` are ``[B, 1, h, w]`` at latent resolution, ``mask`` in [0, 1].
    """
    return (mask.float() - torch.sigmoid(mask_logits.float())).pow(2).mean()


class HandGenerator(LatentDiffusionModule):
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
        optimizer: OptimizerConfig | dict | None = None,
        sampler: SamplerConfig | dict | None = None,
        ema: EMAConfig | dict | None = None,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
    ):
        super().__init__(
            components=components,
            optimizer=optimizer,
            sampler=sampler,
            ema=ema,
            caption_dropout=caption_dropout,
            snr_gamma=snr_gamma,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
        )
        self.mask_loss_weight = mask_loss_weight
        self.pose_dropout = pose_dropout
        self.conditioning = build_conditioning(conditioning)
        self.conditioning.attach(self.unet)
        widen_conv_out(self.unet, LATENT_CHANNELS + 1)

    def encode_pose(self, pose_image: torch.Tensor) -> torch.Tensor:
        """Skeleton ``[B, 3, H, W]`` in [0, 1] -> the UNet's pose condition."""
        return self.conditioning.encode(pose_image, lambda x: self.encode_images(x, sample=False))

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        pose: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the diffusion output ``[B, 4, h, w]`` and mask logits ``[B, 1, h, w]``."""
        out = self.conditioning.predict(self.unet, noisy_latents, timesteps, text_embeddings, pose)
        return out[:, :LATENT_CHANNELS], out[:, LATENT_CHANNELS:]

    def losses(
        self, batch: dict, train: bool, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        latents = self.encode_images(batch["image"], generator=generator)
        pose = self.encode_pose(batch["pose_image"])
        captions = self.drop_captions(batch["caption"]) if train else batch["caption"]
        if train and self.pose_dropout > 0:
            drop = torch.rand(pose.shape[0], device=pose.device) < self.pose_dropout
            pose = torch.where(drop[:, None, None, None], self.conditioning.null(pose), pose)
        text = self.encode_prompts(captions)
        noise, timesteps, noisy = self.add_noise(latents, generator)
        prediction, mask_logits = self(noisy, timesteps, text, pose)
        denoise_loss = self.denoising_loss(prediction, latents, noise, timesteps)
        target_mask = F.interpolate(batch["mask"].float(), size=latents.shape[-2:], mode="area")
        m_loss = mask_loss(mask_logits, target_mask)
        return {
            "loss": denoise_loss + self.mask_loss_weight * m_loss,
            "loss_denoise": denoise_loss,
            "loss_mask": m_loss,
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch, train=True)
        b = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=b)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Same noise and timesteps every validation run, so the curve is comparable.
        generator = torch.Generator().manual_seed(batch_idx)
        with self.ema_weights():
            losses = self.losses(batch, train=False, generator=generator)
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()},
            sync_dist=True,
            batch_size=batch["image"].shape[0],
        )

    @torch.no_grad()
    def sample(
        self,
        pose_images: torch.Tensor,
        prompts: list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate hands for skeletons ``[B, 3, H, W]`` in [0, 1] and their captions.

        Returns images ``[B, 3, H, W]`` and masks ``[B, 1, H, W]``, both in [0, 1]; the mask is
        the head's prediction at the last denoising step, upsampled. The unconditional branch of
        guidance drops the caption (to ``negative_prompt``) and keeps the pose, as HumanSD.
        """
        cfg = self.sampler_config
        steps = num_inference_steps or cfg.num_inference_steps
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        negative = cfg.negative_prompt if negative_prompt is None else negative_prompt
        b, _, height, width = pose_images.shape
        with self.ema_weights():
            pose = self.encode_pose(pose_images.to(self.device))
            text = self.encode_prompts(list(prompts))
            if scale > 1.0:
                text = torch.cat([self.encode_prompts([negative] * b), text])
                pose = torch.cat([pose, pose])
            shape = (b, LATENT_CHANNELS, height // self.vae_scale, width // self.vae_scale)
            noise = randn_tensor(shape, generator=generator, device=self.device)
            last_mask: dict[str, torch.Tensor] = {}

            def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                out, mask_logits = self(x, t, text, pose)
                last_mask["logits"] = mask_logits[-b:]
                return out

            latents = denoise(
                self.sampling_scheduler(scheduler),
                predict,
                noise,
                steps,
                scale,
                generator=generator,
                eta=cfg.eta,
                progress=progress,
            )
            images = self.decode_latents(latents)
        masks = F.interpolate(
            torch.sigmoid(last_mask["logits"].float()), size=(height, width), mode="bilinear"
        )
        return images, masks

    def log_images(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Grid columns for TensorBoard: skeleton | sample | predicted mask | real crop."""
        images, masks = self.sample(batch["pose_image"], batch["caption"], generator=generator)
        return {
            "skeleton": batch["pose_image"],
            "sample": images,
            "mask": masks,
            "real": (batch["image"] + 1) / 2,
        }
