"""Stage 2 of "Giving a Hand to Diffusion Models": a ControlNet on the full-body skeleton that
outpaints the body around the hands pasted on a canvas, with latent blending at sampling."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules.blending import BlendConfig, paste_back
from lightning_modules.components import ComponentsConfig
from lightning_modules.diffusion_module import EMAConfig, OptimizerConfig
from lightning_modules.inpainting import INPAINT_CHANNELS, InpaintingControlNetModule
from lightning_modules.sampling import SamplerConfig


class Outpainter(InpaintingControlNetModule):
    """SD UNet + ControlNet on the full-body skeleton; the canvas (hands, grey elsewhere) and
    the inpainting mask (1 where to paint, i.e. outside the hands) enter as SD-inpainting
    input channels ``[z_t, mask, z_canvas]``.

    ``canvas_input="inpainting_unet"`` (default): the UNet takes the 9 channels (an SD
    inpainting UNet as is; a 4-channel UNet is widened with zero-initialised weights) and the
    ControlNet, built from it, too. ``canvas_input="controlnet"``: the UNet stays a plain
    4-channel UNet and only the ControlNet's input is widened to the 9 channels.

    The ControlNet is trained; the UNet only with ``train_unet``. Loss: the standard denoising
    loss. Sampling blends the canvas latent back in (:mod:`lightning_modules.blending`).
    """

    def __init__(
        self,
        components: ComponentsConfig | dict,
        canvas_input: Literal["inpainting_unet", "controlnet"] = "inpainting_unet",
        train_unet: bool = False,
        controlnet: str | None = None,
        conditioning_scale: float = 1.0,
        blend: BlendConfig | dict | None = None,
        caption_dropout: float = 0.1,
        optimizer: OptimizerConfig | dict | None = None,
        sampler: SamplerConfig | dict | None = None,
        ema: EMAConfig | dict | None = None,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__(
            components=components,
            controlnet_channels=INPAINT_CHANNELS,
            widen_unet=canvas_input == "inpainting_unet",
            train_unet=train_unet,
            controlnet=controlnet,
            conditioning_scale=conditioning_scale,
            caption_dropout=caption_dropout,
            optimizer=optimizer,
            sampler=sampler,
            ema=ema,
            snr_gamma=snr_gamma,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
            channels_last=channels_last,
        )
        self.blend = blend if isinstance(blend, BlendConfig) else BlendConfig(**(blend or {}))

    def inpaint_inputs(self, canvas: torch.Tensor, hand_mask: torch.Tensor, size) -> tuple:
        """Canvas ``[B, 3, H, W]`` in [-1, 1] and known-region mask ``[B, 1, H, W]`` -> the
        inpainting channels: mask to paint ``[B, 1, h, w]`` and canvas latent ``[B, 4, h, w]``."""
        paint = 1 - F.interpolate(hand_mask.float(), size=size, mode="area")
        return paint, self.encode_images(canvas, sample=False)

    def losses(self, batch: dict, train: bool, generator: torch.Generator | None = None):
        latents = self.encode_images(batch["image"], generator=generator)
        paint, canvas_latents = self.inpaint_inputs(
            batch["canvas"], batch["hand_mask"], latents.shape[-2:]
        )
        captions = self.drop_captions(batch["caption"], generator) if train else batch["caption"]
        text = self.encode_prompts(captions)
        noise, timesteps, noisy = self.add_noise(latents, generator)
        prediction = self(noisy, timesteps, text, batch["pose_image"], paint, canvas_latents)
        return {"loss": self.denoising_loss(prediction, latents, noise, timesteps)}

    @torch.no_grad()
    def sample(
        self,
        pose_images: torch.Tensor,
        canvases: torch.Tensor,
        hand_masks: torch.Tensor,
        prompts: list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        scheduler: str | None = None,
        blend: BlendConfig | None = None,
        negative_prompt: str | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Outpaint bodies: skeletons ``[B, 3, H, W]`` in [0, 1], canvases ``[B, 3, H, W]`` in
        [-1, 1], known-region masks ``[B, 1, H, W]`` -> images ``[B, 3, H, W]`` in [0, 1].
        ``blend`` (default: the module's) schedules the blended masks from the pixel mask and
        optionally pastes the canvas back in pixel space."""
        height, width = pose_images.shape[-2:]
        size = (height // self.vae_scale, width // self.vae_scale)
        blend = blend or self.blend
        with self.ema_weights():
            paint, canvas_latents = self.inpaint_inputs(
                canvases.to(self.device), hand_masks.to(self.device), size
            )
            latents = self.sample_inpainting(
                pose_images.to(self.device),
                paint,
                canvas_latents,
                canvas_latents,
                hand_masks,
                prompts,
                blend,
                num_inference_steps,
                guidance_scale,
                generator,
                scheduler,
                negative_prompt,
                progress,
            )
            images = self.decode_latents(latents)
        if blend.paste_back_feather is not None:
            images = paste_back(images, (canvases + 1) / 2, hand_masks, blend.paste_back_feather)
        return images

    def log_images(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Grid columns: skeleton | canvas | sample | real."""
        images = self.sample(
            batch["pose_image"],
            batch["canvas"],
            batch["hand_mask"],
            batch["caption"],
            generator=generator,
        )
        return {
            "skeleton": batch["pose_image"],
            "canvas": (batch["canvas"] + 1) / 2,
            "sample": images,
            "real": (batch["image"] + 1) / 2,
        }
