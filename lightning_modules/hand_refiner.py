"""HandRefiner (Lu et al., ACM MM 2024, arXiv 2311.17957): repair the hands of an image by
inpainting each hand's region with SD-1.5-inpainting guided by a depth ControlNet on a rendered
hand depth map.

Follows the released code (github.com/wenquanlu/HandRefiner, ``handrefiner.py`` and
``cldm/``): UNet input ``[z_t, mask, masked-image latent]`` with the mask downsampled nearest
and the masked image ``source * (mask < 0.5)`` encoded as a VAE posterior sample; the ControlNet
reads the noisy latent alone (``control_v11f1p_sd15_depth``'s layout) and the depth map as a
3-channel image in [0, 1]; one control strength for all 13 residuals; classifier-free guidance
with the negative prompt below, the unconditional branch sharing the inpainting channels and
the depth; the noised latent of the whole source kept outside the mask at every step. Training
(Sec. 4.1): only the ControlNet, 50 % prompt dropout, the plain denoising loss.

Deviations (README, "HandRefiner"): the latent mask is ``H/8 x W/8`` (the release hard-codes
64 x 64 and fails on any size but 512) and sizes that are not multiples of 8 are padded; the
source is blended in after each step at the next step's noise level and, after the last, the
clean source latent (the release blends before each model call and not after the last, so its
output changes outside the mask); the decoded image is pasted into the original inside the
mask only (optionally feathered), so every pixel outside the mask is the input's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.blending import BlendConfig, paste_back
from lightning_modules.components import ComponentsConfig
from lightning_modules.diffusion_module import EMAConfig, OptimizerConfig
from lightning_modules.inpainting import LATENT_CHANNELS, InpaintingControlNetModule
from lightning_modules.sampling import SamplerConfig

# handrefiner.py's n_prompt
NEGATIVE_PROMPT = (
    "fake 3D rendered image, longbody, lowres, bad anatomy, bad hands, missing fingers, extra "
    "digit, fewer digits, cropped, worst quality, low quality, blue"
)
RELEASED_SAMPLER = dict(
    scheduler="ddim", num_inference_steps=50, guidance_scale=9.0, eta=0.0,
    negative_prompt=NEGATIVE_PROMPT,
)  # fmt: skip
# the order the released adaptive mode tries strengths in (1.0 is the reference)
ADAPTIVE_STRENGTHS = (1.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class HandRefiner(InpaintingControlNetModule):
    """SD-inpainting UNet (frozen) + depth ControlNet (trained).

    ``strength``: the ControlNet's scale at sampling (released default 0.55, README range
    0.4-0.8; 1.0 copies the depth's flat texture); training runs at 1.0, as released.
    ``controlnet_channels``: 4, the noisy latent only, as the released depth ControlNet; 9
    lets it see the mask and masked image too.
    ``feather``: px of alpha ramp inside the mask when pasting the refined region back (0: a
    hard paste).

    Batches for training: ``image`` ``[B, 3, H, W]`` in [-1, 1], ``hand_mask`` ``[B, 1, H, W]``
    in {0, 1} (1 = the region to inpaint), ``depth`` ``[B, 1, H, W]`` in [0, 1], ``caption``.
    """

    def __init__(
        self,
        components: ComponentsConfig | dict,
        controlnet: str | None = None,
        controlnet_channels: int = LATENT_CHANNELS,
        train_unet: bool = False,
        strength: float = 0.55,
        feather: float = 0.0,
        caption_dropout: float = 0.5,
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
            controlnet_channels=controlnet_channels,
            train_unet=train_unet,
            controlnet=controlnet,
            # trained at full strength (the release's control_scales = [1.0] * 13); the
            # strength scales the residuals at sampling only
            conditioning_scale=1.0,
            caption_dropout=caption_dropout,
            optimizer=optimizer,
            sampler=RELEASED_SAMPLER if sampler is None else sampler,
            ema=ema,
            snr_gamma=snr_gamma,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
            channels_last=channels_last,
        )
        self.strength = strength
        self.feather = feather

    def inpaint_inputs(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, H, W]`` in [-1, 1] and masks ``[B, 1, H, W]`` (1 = inpaint) -> the
        mask at latent size ``[B, 1, H/8, W/8]`` (nearest, thresholded at 0.5) and the latent
        of the masked image ``[B, 4, H/8, W/8]`` (a posterior sample, as released)."""
        binary = (masks >= 0.5).float()
        size = (images.shape[-2] // self.vae_scale, images.shape[-1] // self.vae_scale)
        paint = F.interpolate(binary, size=size, mode="nearest")
        masked = images * (1 - binary.to(images))
        return paint, self.encode_images(masked, sample=True, generator=generator)

    @staticmethod
    def control_image(depths: torch.Tensor) -> torch.Tensor:
        """Depth ``[B, 1, H, W]`` in [0, 1] -> the ControlNet's 3-channel image."""
        return depths.expand(-1, 3, -1, -1)

    def losses(self, batch: dict, train: bool, generator: torch.Generator | None = None):
        latents = self.encode_images(batch["image"], generator=generator)
        paint, masked_latents = self.inpaint_inputs(batch["image"], batch["hand_mask"], generator)
        captions = self.drop_captions(batch["caption"], generator) if train else batch["caption"]
        text = self.encode_prompts(captions)
        noise, timesteps, noisy = self.add_noise(latents, generator)
        control = self.control_image(batch["depth"])
        prediction = self(noisy, timesteps, text, control, paint, masked_latents)
        return {"loss": self.denoising_loss(prediction, latents, noise, timesteps)}

    @torch.no_grad()
    def refine(
        self,
        images: torch.Tensor,
        depths: torch.Tensor,
        masks: torch.Tensor,
        prompts: list[str],
        strength: float | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        feather: float | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Inpaint the masked regions: images ``[B, 3, H, W]`` in [0, 1] (any H, W), depth
        ``[B, 1, H, W]`` in [0, 1], masks ``[B, 1, H, W]`` (1 = inpaint) -> images
        ``[B, 3, H, W]`` in [0, 1], equal to ``images`` wherever the mask is 0."""
        height, width = images.shape[-2:]
        step = self.vae_scale
        pad = (0, -width % step, 0, -height % step)
        device = self.device
        source = F.pad(images.to(device) * 2 - 1, pad, mode="replicate")
        control = self.control_image(F.pad(depths.to(device), pad))
        mask = F.pad(masks.to(device).float(), pad)
        strength = self.strength if strength is None else strength
        with self.ema_weights(), self.conditioning.scaled(strength):
            known_latents = self.encode_images(source, sample=True, generator=generator)
            paint, masked_latents = self.inpaint_inputs(source, mask, generator)
            latents = self.sample_inpainting(
                control,
                paint,
                masked_latents,
                known_latents,
                1 - paint,
                prompts,
                BlendConfig(mode="fixed"),
                num_inference_steps,
                guidance_scale,
                generator,
                scheduler,
                negative_prompt,
                progress,
            )
            refined = self.decode_latents(latents)[..., :height, :width]
        feather = self.feather if feather is None else feather
        return paste_back(images.to(refined), refined, masks.to(refined), feather)

    def log_images(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Grid columns: masked input | depth | refined | real."""
        images = (batch["image"] + 1) / 2
        refined = self.refine(
            images, batch["depth"], batch["hand_mask"], batch["caption"], generator=generator
        )
        return {
            "input": images * (1 - batch["hand_mask"]),
            "depth": self.control_image(batch["depth"]),
            "refined": refined,
            "real": images,
        }
