"""Pose-conditioned latent diffusion: a UNet plus a swappable pose conditioning piece.

The shared base of the hand generator (stage 1), HumanSD and the ControlNet pose baseline.
Subclasses change the UNet's outputs or the loss through :meth:`loss_terms`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from lightning_modules.components import ComponentsConfig
from lightning_modules.conditioning import build_conditioning
from lightning_modules.diffusion_module import (
    EMAConfig,
    LatentDiffusionModule,
    OptimizerConfig,
    as_config,
)
from lightning_modules.lora import LoRASettings, add_lora, save_lora
from lightning_modules.perceptual_loss import (
    PerceptualLoss,
    PerceptualLossConfig,
    loss_weights,
    one_step_x0,
)
from lightning_modules.perceptual_networks import FaceFeatures, build_lpips
from lightning_modules.sampling import SamplerConfig, denoise, pose_and_text_guidance
from pose_estimation.people import to_uint8_hwc

LATENT_CHANNELS = 4


NO_PIXELS_IN_CACHE = (
    "perceptual: the loss compares decoded and real pixels, which a latent cache does not "
    "hold; train it without data.params.latent_cache"
)


class PoseConditionedDiffusion(LatentDiffusionModule):
    """Text + pose-image conditioned SD.

    ``conditioning="concat"``: the VAE-encoded skeleton concatenated to the noisy latent
    (``conv_in`` 4 -> 8, zero-initialised); ``"controlnet"``: a ControlNet on the skeleton
    image (``conditioning_scale``; ``controlnet`` = a pretrained one to start from);
    ``"none"``: plain text-to-image SD (the pose images only set the output size). The UNet is
    trained unless ``train_unet=False`` (the ControlNet recipe: frozen SD). Classifier-free
    guidance drops captions (``caption_dropout``) and, optionally, poses (``pose_dropout``);
    a model trained with dropped poses samples with a pose guidance scale
    (``sampler.pose_guidance_scale``, :func:`~lightning_modules.sampling.pose_and_text_guidance`),
    and one trained without them refuses that scale (its null pose was never learned).

    ``lora``: train LoRA adapters (:mod:`lightning_modules.lora`) on the frozen UNet (and text
    encoder) of plain SD (``conditioning="none"``, ``train_unet=False``); exported in
    diffusers' LoRA format, which every method loads as ``components.lora``.

    As configured by ``experiments/controlnet/*.yaml`` (``conditioning: controlnet``,
    ``train_unet: false``) this is the ControlNet pose baseline of diffusers' ControlNet
    training example; by ``experiments/plain_sd/*.yaml`` the plain SD baseline; by
    ``experiments/lora/*.yaml`` the community's hand LoRA.
    """

    def __init__(
        self,
        components: ComponentsConfig | dict,
        conditioning: Literal["concat", "controlnet", "none"] = "concat",
        conditioning_scale: float = 1.0,
        controlnet: str | None = None,
        train_unet: bool = True,
        caption_dropout: float = 0.1,
        pose_dropout: float = 0.0,
        optimizer: OptimizerConfig | dict | None = None,
        sampler: SamplerConfig | dict | None = None,
        ema: EMAConfig | dict | None = None,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        lora: LoRASettings | dict | None = None,
        perceptual: PerceptualLossConfig | dict | None = None,
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
        self.lora = as_config(LoRASettings, lora) if lora is not None else None
        if self.lora is not None and train_unet:
            raise ValueError("lora trains adapters on a frozen UNet: set train_unet: false")
        if self.lora is not None and conditioning != "none":
            # a pose piece would train beside the adapters and be lost from a LoRA export
            raise ValueError(
                "lora is trained on plain SD (conditioning: none); a pose-conditioned method "
                "takes a trained LoRA as components.lora"
            )
        self.pose_dropout = pose_dropout
        pose_scale = self.sampler_config.pose_guidance_scale
        if conditioning == "none" and (pose_dropout > 0 or pose_scale is not None):
            raise ValueError("conditioning='none' has no pose to drop or to guide by")
        if pose_dropout > 0 and pose_scale is None:
            raise ValueError(
                f"pose_dropout={pose_dropout} trains a null pose that only pose guidance uses: "
                "set sampler.pose_guidance_scale (1.0 = text guidance alone) or pose_dropout=0"
            )
        if pose_scale is not None and pose_dropout == 0:
            raise ValueError(
                f"sampler.pose_guidance_scale={pose_scale} needs a null pose the model learned: "
                "train with pose_dropout > 0"
            )
        kwargs = {}
        if conditioning == "controlnet":
            kwargs = {"conditioning_scale": conditioning_scale, "pretrained": controlnet}
        self.conditioning = build_conditioning(conditioning, **kwargs)
        self.conditioning.attach(self.unet)
        if not train_unet:
            self.freeze("unet")
        if self.lora is not None:
            add_lora(self.unet, self.text_encoder, self.lora)
        self.perceptual = self.build_perceptual(perceptual) if perceptual is not None else None
        if self.perceptual is not None:
            self.freeze("perceptual")

    @staticmethod
    def build_perceptual(config: PerceptualLossConfig | dict) -> PerceptualLoss:
        """The mask-aware perceptual loss and its networks (:mod:`perceptual_loss`)."""
        cfg = as_config(PerceptualLossConfig, config)
        tiny = cfg.networks == "tiny"
        lpips = build_lpips(None if tiny else cfg.vgg_weights)
        face = None
        if cfg.face_weight > 0:
            face = FaceFeatures(None if tiny else cfg.face_weights, tiny=tiny)
        return PerceptualLoss(cfg, lpips, face)

    def encode_pose(self, pose_image: torch.Tensor) -> torch.Tensor:
        """Skeleton ``[B, 3, H, W]`` in [0, 1] -> the UNet's pose condition."""
        return self.conditioning.encode(pose_image, lambda x: self.encode_images(x, sample=False))

    def unet_output(self, noisy, timesteps, text_embeddings, pose) -> torch.Tensor:
        """The UNet's raw output ``[B, C_out, h, w]``; its first 4 channels are the diffusion
        prediction."""
        return self.conditioning.predict(self.unet, noisy, timesteps, text_embeddings, pose)

    def forward(self, noisy, timesteps, text_embeddings, pose) -> torch.Tensor:
        return self.unet_output(noisy, timesteps, text_embeddings, pose)[:, :LATENT_CHANNELS]

    def loss_terms(
        self, batch, output, latents, noise, timesteps, generator=None
    ) -> dict[str, torch.Tensor]:
        """Loss terms from the raw UNet output; ``loss`` is the one optimised. ``generator``
        (validation) seeds any randomness a loss term draws."""
        prediction = output[:, :LATENT_CHANNELS]
        return {"loss": self.denoising_loss(prediction, latents, noise, timesteps)}

    def losses(
        self, batch: dict, train: bool, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        latents = self.training_latents(batch, generator)
        pose = (
            batch["pose_latent"]
            if "pose_latent" in batch
            else self.encode_pose(batch["pose_image"])
        )
        captions = self.drop_captions(batch["caption"], generator) if train else batch["caption"]
        if train and self.pose_dropout > 0:
            drop = (torch.rand(pose.shape[0], generator=generator) < self.pose_dropout).to(
                pose.device
            )
            drop = drop.view(-1, *[1] * (pose.ndim - 1))
            pose = torch.where(drop, self.conditioning.null(pose), pose)
        text = self.training_text(batch, captions)
        timesteps = None
        if self.perceptual is not None:
            if "image" not in batch:
                raise ValueError(NO_PIXELS_IN_CACHE)
            steps = self.noise_scheduler.config.num_train_timesteps
            timesteps = self.perceptual.timesteps(latents.shape[0], steps, generator)
        noise, timesteps, noisy = self.add_noise(latents, generator, timesteps)
        output = self.unet_output(noisy, timesteps, text, pose)
        terms = self.loss_terms(batch, output, latents, noise, timesteps, generator)
        if self.perceptual is not None:
            terms = self.with_perceptual(
                terms, batch, noisy, output[:, :LATENT_CHANNELS], timesteps
            )
        return terms

    def cache_identity(self, text: bool) -> dict:
        if self.perceptual is not None:
            raise ValueError(NO_PIXELS_IN_CACHE)
        return super().cache_identity(text)

    @torch.no_grad()
    def latent_cache_tensors(self, batch: dict, text: bool = False) -> dict[str, torch.Tensor]:
        """The tensors a latent cache holds for a batch of examples (``datamodules.latent_cache``):
        the image's VAE posterior, the pose condition (its latent, or the skeleton as uint8 when
        the condition is the image itself), the hand mask at latent resolution, with ``text``
        the text encoder's states."""
        posterior = self.vae.encode(batch["image"].to(self.vae.dtype)).latent_dist
        out = {"latent_mean": posterior.mean.float(), "latent_std": posterior.std.float()}
        pose = self.encode_pose(batch["pose_image"])
        if pose is batch["pose_image"]:
            out["pose_image"] = (batch["pose_image"] * 255).round().to(torch.uint8)
        else:
            out["pose_latent"] = pose.float()
        if "mask" in batch:
            size = posterior.mean.shape[-2:]
            out["mask_latent"] = F.interpolate(batch["mask"].float(), size=size, mode="area")
        if text:
            out["text_embedding"] = self.encode_prompts(batch["caption"])
        return out

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] with gradients to the latents. With
        ``decoder_checkpointing`` the frozen decoder keeps only its blocks' inputs and recomputes
        one block at a time in backward (diffusers' per-block checkpointing: one checkpoint
        around the whole decoder would recompute all of its activations at once, the same peak)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = (latents / self.vae.config.scaling_factor + shift).to(self.vae.dtype)
        checkpointing = self.perceptual.config.decoder_checkpointing
        if checkpointing and not self.vae.decoder.gradient_checkpointing:
            # a no-op without gradients (the encoder and sampling run under no_grad)
            self.vae.enable_gradient_checkpointing()
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    def region_mask(self, batch: dict) -> torch.Tensor:
        """Where the LPIPS term looks ``[B, 1, H, W]``: the hands (the batch's hand mask) or the
        people (their keypoint boxes, 10 % margin)."""
        if self.perceptual.config.region == "hand":
            mask = batch.get("mask", batch.get("hand_mask"))
            if mask is None:
                raise ValueError("perceptual.region=hand needs batches with a hand mask")
            return mask.float()
        if "body_keypoints" not in batch:
            raise ValueError("perceptual.region=person needs batches with body_keypoints")
        b, _, height, width = batch["image"].shape
        mask = torch.zeros(b, 1, height, width, device=batch["image"].device)
        for i, people in enumerate(batch["body_keypoints"]):
            for person in people:
                points = person[person[:, 2] > 0, :2]
                if len(points) < 2:
                    continue
                lo, hi = points.min(0).values, points.max(0).values
                margin = 0.1 * (hi - lo)
                x0, y0 = (lo - margin).clamp(min=0).long().tolist()
                x1, y1 = (hi + margin).ceil().long().tolist()
                mask[i, 0, y0 : min(y1, height), x0 : min(x1, width)] = 1
        return mask

    def face_boxes(self, images: torch.Tensor) -> list[tuple]:
        """``(index, x0, y0, x1, y1)`` of the faces MediaPipe finds in real images ``[N, 3, H,
        W]`` in [-1, 1]."""
        if not hasattr(self, "_faces"):
            from pose_estimation.mediapipe_faces import MediaPipeFaces

            self._faces = MediaPipeFaces()
        pixels = to_uint8_hwc((images.float() + 1) / 2)
        return [(i, *box) for i, image in enumerate(pixels) for box in self._faces(image)]

    def with_perceptual(self, terms, batch, noisy, prediction, timesteps) -> dict:
        """The method's loss combined with the perceptual terms of the samples with t <= T:
        ``mean_i[g_i (w_lpips,i L_lpips,i + w_face,i L_face,i)] + mean_i[w_ldm,i] L_method``
        (g_i: t_i <= T; w_ldm,i = 1 for the others). With one t per batch (the reference)
        this is the reference's ``λ1 L_lpips + λ2 L_face + (1 - λ1 - λ2) L_LDM``."""
        cfg = self.perceptual.config
        gate = timesteps <= cfg.max_timestep
        b = len(timesteps)
        terms["perceptual_fraction"] = gate.float().mean()
        if not gate.any():
            return terms
        idx = gate.nonzero().squeeze(1)
        x0 = one_step_x0(
            noisy[idx], prediction[idx], timesteps[idx], self.noise_scheduler.alphas_cumprod,
            self.noise_scheduler.config.prediction_type,
        )  # fmt: skip
        real = batch["image"][idx].to(x0)
        faces = self.face_boxes(real) if self.perceptual.face_features is not None else []
        parts = self.perceptual(
            self.decode_with_grad(x0), real, self.region_mask(batch)[idx].to(x0), faces
        )
        w_lpips, w_face, w_ldm = loss_weights(
            cfg.lpips_weight, cfg.face_weight, parts["has_region"], parts["has_face"]
        )
        perceptual = (w_lpips * parts["lpips"] + w_face * parts["face"]).sum() / b
        ldm_weight = (w_ldm.sum() + (b - len(idx))) / b
        terms["ldm"] = terms["loss"]
        terms["lpips"] = parts["lpips"].mean()
        terms["face"] = parts["face"].mean()
        terms["loss"] = perceptual + ldm_weight * terms["loss"]
        return terms

    @torch.no_grad()
    def generate(
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
        """Images ``[B, 3, H, W]`` in [0, 1] and the raw UNet output of the last step (the
        conditional half) for skeletons ``[B, 3, H, W]`` in [0, 1]. The unconditional branch
        of guidance drops the caption (to ``negative_prompt``) and keeps the pose (HumanSD),
        unless the sampler has a ``pose_guidance_scale``: then three branches (no pose and no
        caption, pose only, both) are combined by :func:`pose_and_text_guidance`."""
        cfg = self.sampler_config
        steps = num_inference_steps or cfg.num_inference_steps
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        negative = cfg.negative_prompt if negative_prompt is None else negative_prompt
        pose_scale = cfg.pose_guidance_scale
        b, _, height, width = pose_images.shape
        with self.ema_weights():
            pose = self.encode_pose(pose_images.to(self.device))
            text = self.encode_prompts(list(prompts))
            if pose_scale is not None:
                null_text = self.encode_prompts([negative] * b)
                text = torch.cat([null_text, null_text, text])
                pose = torch.cat([self.conditioning.null(pose), pose, pose])
            elif scale > 1.0:
                text = torch.cat([self.encode_prompts([negative] * b), text])
                pose = torch.cat([pose, pose])
            shape = (b, LATENT_CHANNELS, height // self.vae_scale, width // self.vae_scale)
            noise = randn_tensor(shape, generator=generator, device=self.device)
            last: dict[str, torch.Tensor] = {}

            def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                if pose_scale is not None:
                    x = torch.cat([x, x, x])
                output = self.unet_output(x, t, text, pose)
                last["output"] = output[-b:]
                output = output[:, :LATENT_CHANNELS]
                if pose_scale is not None:
                    return pose_and_text_guidance(*output.chunk(3), pose_scale, scale)
                return output

            latents = denoise(
                self.sampling_scheduler(scheduler),
                predict,
                noise,
                steps,
                # three-branch guidance happens inside predict
                1.0 if pose_scale is not None else scale,
                generator=generator,
                eta=cfg.eta,
                progress=progress,
            )
            return self.decode_latents(latents), last["output"]

    def sample(self, pose_images: torch.Tensor, prompts: list[str], **kwargs) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (keyword arguments as :meth:`generate`)."""
        return self.generate(pose_images, prompts, **kwargs)[0]

    def export_diffusers(self, out_dir: str | os.PathLike) -> Path:
        """With ``lora``: the adapters (EMA weights when on) as ``pytorch_lora_weights.
        safetensors``, which ``StableDiffusionPipeline.load_lora_weights`` and handdiff's
        ``components.lora`` load, and ``handdiff.json``; otherwise the UNet (see the base)."""
        if self.lora is None:
            return super().export_diffusers(out_dir)
        out = Path(out_dir)
        with self.ema_weights():
            save_lora(out, self.unet, self.text_encoder, self.lora)
        record = {"class": type(self).__qualname__, "lora": asdict(self.lora)}
        (out / "handdiff.json").write_text(json.dumps(record, indent=2))
        return out

    def log_images(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Grid columns: skeleton | sample | real."""
        return {
            "skeleton": batch["pose_image"],
            "sample": self.sample(batch["pose_image"], batch["caption"], generator=generator),
            "real": (batch["image"] + 1) / 2,
        }
