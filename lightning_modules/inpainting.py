"""SD-inpainting + ControlNet plumbing shared by the stage-2 outpainter and HandRefiner.

Both feed the UNet SD-inpainting's 9 input channels ``[z_t, mask to paint, masked-image
latent]`` (the order of runwayml/stable-diffusion-inpainting, of diffusers'
``StableDiffusionControlNetInpaintPipeline`` and of HandRefiner's ``c_concat``), steer it with a
ControlNet on a pixel-space image (a skeleton, a hand depth map), and keep the known region by
blending its noised latent back in after every step (:mod:`lightning_modules.blending`).
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from lightning_modules.blending import BlendConfig, LatentBlender
from lightning_modules.components import ComponentsConfig
from lightning_modules.conditioning import ControlNetPoseConditioning
from lightning_modules.diffusion_module import EMAConfig, LatentDiffusionModule, OptimizerConfig
from lightning_modules.sampling import SamplerConfig, denoise
from lightning_modules.unet_surgery import narrow_conv_in, widen_conv_in

LATENT_CHANNELS = 4
INPAINT_CHANNELS = 2 * LATENT_CHANNELS + 1  # noisy latent, inpainting mask, masked-image latent


class InpaintingControlNetModule(LatentDiffusionModule):
    """A 9-channel inpainting UNet (a 4-channel one is widened with zero weights) and a
    ControlNet. ``controlnet_channels``: the latent channels the ControlNet reads, 9 (it sees
    the mask and the masked image too) or 4 (the noisy latent only, as a ControlNet trained
    for plain SD, e.g. ``control_v11f1p_sd15_depth``). A ControlNet built from the UNet takes
    the UNet's input convolution, cut or widened to that many channels.

    The ControlNet is trained; the UNet only with ``train_unet``.
    """

    def __init__(
        self,
        components: ComponentsConfig | dict,
        controlnet_channels: int = INPAINT_CHANNELS,
        widen_unet: bool = True,
        train_unet: bool = False,
        controlnet: str | None = None,
        conditioning_scale: float = 1.0,
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
            optimizer=optimizer,
            sampler=sampler,
            ema=ema,
            caption_dropout=caption_dropout,
            snr_gamma=snr_gamma,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
            channels_last=channels_last,
        )
        if widen_unet:
            widen_conv_in(self.unet, INPAINT_CHANNELS)
        self.conditioning = ControlNetPoseConditioning(conditioning_scale, pretrained=controlnet)
        self.conditioning.attach(self.unet)
        net = self.conditioning.controlnet
        if net.config.in_channels > controlnet_channels:
            narrow_conv_in(net, controlnet_channels)
        else:
            widen_conv_in(net, controlnet_channels)
        if gradient_checkpointing:
            net.enable_gradient_checkpointing()
        if not train_unet:
            self.freeze("unet")

    def forward(self, noisy, timesteps, text, control, paint, masked_latents) -> torch.Tensor:
        """UNet output for noisy latents ``[B, 4, h, w]``, the mask to paint ``[B, 1, h, w]``,
        the masked-image latent ``[B, 4, h, w]`` and the ControlNet image ``[B, 3, H, W]``."""
        x = torch.cat([noisy, paint.to(noisy), masked_latents.to(noisy)], dim=1)
        return self.conditioning.predict(self.unet, x, timesteps, text, control)

    @torch.no_grad()
    def sample_inpainting(
        self,
        control: torch.Tensor,
        paint: torch.Tensor,
        masked_latents: torch.Tensor,
        known_latents: torch.Tensor,
        known_mask: torch.Tensor,
        prompts: list[str],
        blend: BlendConfig,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Denoise from noise with classifier-free guidance (the negative prompt in the
        unconditional branch, which shares the control image and inpainting channels) and
        return the latents ``[B, 4, h, w]``; ``known_latents`` are blended in where
        ``known_mask`` (pixels, or cells when at latent size) says, as ``blend`` schedules."""
        cfg = self.sampler_config
        steps = num_inference_steps or cfg.num_inference_steps
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        negative = cfg.negative_prompt if negative_prompt is None else negative_prompt
        b = control.shape[0]
        text = self.encode_prompts(list(prompts))
        if scale > 1.0:
            text = torch.cat([self.encode_prompts([negative] * b), text])
        twice = (lambda t: torch.cat([t, t])) if scale > 1.0 else (lambda t: t)
        noise = randn_tensor(
            (b, LATENT_CHANNELS, *masked_latents.shape[-2:]),
            generator=generator,
            device=self.device,
        )
        sampling_scheduler = self.sampling_scheduler(scheduler)
        blender = LatentBlender(
            sampling_scheduler, known_latents, known_mask, blend, generator=generator
        )
        return denoise(
            sampling_scheduler,
            lambda x, t: self(x, t, text, twice(control), twice(paint), twice(masked_latents)),
            noise,
            steps,
            scale,
            generator=generator,
            eta=cfg.eta,
            progress=progress,
            after_step=blender,
        )
