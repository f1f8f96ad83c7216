"""HumanSD (Ju et al. 2023, arXiv 2304.04269): the pose image VAE-encoded and concatenated to
the noisy latent, trained with the heatmap-guided denoising loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules.components import ComponentsConfig
from lightning_modules.diffusion_module import EMAConfig, OptimizerConfig, as_config
from lightning_modules.pose_conditioned import LATENT_CHANNELS, PoseConditionedDiffusion
from lightning_modules.sampling import SamplerConfig


@dataclass
class HeatmapWeightConfig:
    """Where the heatmap weight W of W_a = 1 + lambda * W comes from.

    ``source="gt"``: Gaussian heatmaps (std ``sigma`` px) of the conditioning keypoints; no
    extra network. ``source="network"``: ``network`` (``target``/``params`` of any module
    mapping images ``[B, 3, H, W]`` in [0, 1] to heatmaps ``[B, J, h, w]``, e.g. an mmpose
    model) on the decoded noise difference ``clamp((D(eps_theta - eps) + 1) / 2, 0, 1)``.

    ``variant="paper"`` (eq. 6 as written): W = sum_j 1[H_j > threshold], resized to latent
    resolution. ``variant="code"`` (HumanSD's released training code, their issue #30): the
    binarisation is inverted (1[H_j <= threshold]) and the map, scaled to [0, 1] by the number
    of joints, is VAE-encoded instead of resized — our reading of that code.
    """

    source: Literal["gt", "network"] = "gt"
    variant: Literal["paper", "code"] = "paper"
    weight: float = 0.1  # lambda
    threshold: float = 0.05
    sigma: float = 2.0
    network: dict | None = None


def gaussian_heatmaps(keypoints: torch.Tensor, size: tuple[int, int], sigma: float):
    """Keypoints ``[B, P, K, 3]`` (pixels; people with no labelled keypoint are ignored) ->
    heatmaps ``[B, K, H, W]`` in [0, 1]: per joint, the max over people of a Gaussian."""
    height, width = size
    ys = torch.arange(height, device=keypoints.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=keypoints.device, dtype=torch.float32) + 0.5
    x = keypoints[..., 0, None, None]
    y = keypoints[..., 1, None, None]
    d2 = (xs.view(1, 1, 1, 1, -1) - x) ** 2 + (ys.view(1, 1, 1, -1, 1) - y) ** 2
    heat = torch.exp(-d2 / (2 * sigma**2)) * (keypoints[..., 2, None, None] > 0)
    return heat.amax(dim=1)


def binary_weight_map(heatmaps: torch.Tensor, threshold: float, invert: bool) -> torch.Tensor:
    """Sum over joints of the binarised heatmaps ``[B, J, H, W]`` -> ``[B, 1, H, W]``."""
    binary = heatmaps <= threshold if invert else heatmaps > threshold
    return binary.float().sum(dim=1, keepdim=True)


def weighted_denoising_loss(
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """L_h = mean(W_a * (target - prediction)^2) (HumanSD, eq. 6), W_a broadcast over
    channels."""
    return (weight * (target.float() - prediction.float()) ** 2).mean()


class HumanSD(PoseConditionedDiffusion):
    """Pose-image concatenation (``conv_in`` 4 -> 8, zero-initialised) with the heatmap-guided
    loss; batches carry ``body_keypoints`` ``[B, P, 17, 3]`` for the ``gt`` heatmaps. Sampling
    is the shared pose-conditioned sampler (guidance keeps the pose in both branches)."""

    def __init__(
        self,
        components: ComponentsConfig | dict,
        heatmap: HeatmapWeightConfig | dict | None = None,
        caption_dropout: float = 0.1,
        pose_dropout: float = 0.0,
        optimizer: OptimizerConfig | dict | None = None,
        sampler: SamplerConfig | dict | None = None,
        ema: EMAConfig | dict | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
    ):
        super().__init__(
            components=components,
            conditioning="concat",
            caption_dropout=caption_dropout,
            pose_dropout=pose_dropout,
            optimizer=optimizer,
            sampler=sampler,
            ema=ema,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
        )
        self.heatmap = as_config(HeatmapWeightConfig, heatmap)
        self.heatmap_network = None
        if self.heatmap.source == "network":
            if not self.heatmap.network:
                raise ValueError("heatmap.source='network' needs heatmap.network (target/params)")
            from experiments.config import instantiate

            self.heatmap_network = instantiate(self.heatmap.network)
            self.freeze("heatmap_network")

    @torch.no_grad()
    def weight_map(self, batch: dict, prediction, noise, latents) -> torch.Tensor:
        """W at latent resolution: ``[B, 1, h, w]`` (paper) or ``[B, 4, h, w]`` (code)."""
        cfg = self.heatmap
        if cfg.source == "gt":
            heat = gaussian_heatmaps(batch["body_keypoints"], batch["image"].shape[-2:], cfg.sigma)
        else:
            difference = self.decode_latents(prediction.detach() - noise)
            heat = self.heatmap_network(difference)
        weight = binary_weight_map(heat, cfg.threshold, invert=cfg.variant == "code")
        if cfg.variant == "paper":
            return F.interpolate(weight, size=latents.shape[-2:], mode="area")
        scaled = weight / heat.shape[1]
        image = F.interpolate(scaled, size=batch["image"].shape[-2:], mode="bilinear")
        return self.encode_images(image.expand(-1, 3, -1, -1) * 2 - 1, sample=False)

    def loss_terms(self, batch, output, latents, noise, timesteps):
        prediction = output[:, :LATENT_CHANNELS]
        target = self.loss_target(latents, noise, timesteps)
        weight = self.weight_map(batch, prediction, noise, latents)
        loss = weighted_denoising_loss(prediction, target, 1 + self.heatmap.weight * weight)
        return {
            "loss": loss,
            "loss_denoise": F.mse_loss(prediction.float(), target.float()).detach(),
            "heatmap_weight": weight.mean(),
        }
