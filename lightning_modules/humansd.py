"""HumanSD (Ju et al. 2023, arXiv 2304.04269): the pose image VAE-encoded and concatenated to
the noisy latent, trained with the heatmap-guided denoising loss.

Two forms of the loss, each named for where it comes from:

- ``variant="eq6"``, the paper's eq. 6 as written: L_h = E ||W_a * (eps - eps_theta)||^2 with
  W_a = 1 + lambda * W inside the squared norm (every element weighted by W_a^2), W the sum over
  joints of the binarised heatmaps 1[H_j > threshold], area-resized to the latent grid.
- ``variant="released_code"``, what HumanSD's released training code computes
  (``ldm/models/diffusion/ddpm.py``, ``LatentPoseText2ImageDiffusion_HumanSD.p_losses``): per
  joint 1[H_j <= threshold] (the binarisation inverted), summed over joints (a count map
  0..J), repeated to 3 channels, resized *bicubically* to the image size, fed to the VAE
  encoder *unnormalised* (values up to J), a posterior *sample* x the scaling factor, and
  W_a = 1 + lambda * W multiplying the squared error outside the square.

Heatmaps H come from a pose network on the decoded noise difference
``clamp((D(eps_theta - eps) + 1) / 2, 0, 1)`` (``source="network"``, the paper's and the
code's) or, as a cheap surrogate that needs no network, from Gaussians at the conditioning
keypoints (``source="gt"``). The surrogate is constant over t, which the paper warns against
("assigning a constant weight map at all steps might disrupt training"); it is rendered on a
``heatmap_size`` grid with std ``sigma`` grid pixels, as HigherHRNet's stride-4 heatmaps of a
512 px input are (sigma 2 = 8 image px at 512 px), so it covers the same fraction of the image
at every resolution.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Where the heatmap weight W of W_a = 1 + lambda * W comes from and how it enters the loss
    (module docstring).

    ``network``: ``target``/``params`` of a module mapping images ``[B, 3, H, W]`` in [0, 1] to
    heatmaps ``[B, J, h, w]`` (e.g. ``metrics.heatmap_networks.MMPoseHeatmaps``).
    """

    source: Literal["gt", "network"] = "gt"
    variant: Literal["eq6", "released_code"] = "eq6"
    weight: float = 0.1  # lambda
    threshold: float = 0.05
    sigma: float = 2.0  # gt: Gaussian std in heatmap-grid pixels
    heatmap_size: int = 128  # gt: the heatmap grid's side (HigherHRNet at 512 px input: 128)
    network: dict | None = None


def gaussian_heatmaps(keypoints: torch.Tensor, size: tuple[int, int], sigma: float):
    """Keypoints ``[B, P, K, 3]`` (pixels of a ``size`` grid; people with no labelled keypoint
    are ignored) -> heatmaps ``[B, K, H, W]`` in [0, 1]: per joint, the max over people of a
    Gaussian."""
    height, width = size
    ys = torch.arange(height, device=keypoints.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=keypoints.device, dtype=torch.float32) + 0.5
    x = keypoints[..., 0, None, None]
    y = keypoints[..., 1, None, None]
    d2 = (xs.view(1, 1, 1, 1, -1) - x) ** 2 + (ys.view(1, 1, 1, -1, 1) - y) ** 2
    heat = torch.exp(-d2 / (2 * sigma**2)) * (keypoints[..., 2, None, None] > 0)
    return heat.amax(dim=1)


def surrogate_heatmaps(
    keypoints: torch.Tensor, image_size: tuple[int, int], config: HeatmapWeightConfig
) -> torch.Tensor:
    """``source="gt"``: keypoints ``[B, P, K, 3]`` in image pixels -> Gaussian heatmaps on the
    ``heatmap_size`` grid (the longer image side maps to it) with std ``sigma`` grid pixels."""
    scale = config.heatmap_size / max(image_size)
    grid = (round(image_size[0] * scale), round(image_size[1] * scale))
    scaled = keypoints.clone()
    scaled[..., :2] = keypoints[..., :2] * scale
    return gaussian_heatmaps(scaled, grid, config.sigma)


def binary_weight_map(heatmaps: torch.Tensor, threshold: float, invert: bool) -> torch.Tensor:
    """Sum over joints of the binarised heatmaps ``[B, J, H, W]`` -> ``[B, 1, H, W]``:
    1[H > threshold] (eq. 6), or 1[H <= threshold] (``invert``, the released code)."""
    binary = heatmaps <= threshold if invert else heatmaps > threshold
    return binary.float().sum(dim=1, keepdim=True)


def eq6_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
    """HumanSD eq. 6: mean((W_a * (target - prediction))^2), ``weight`` = W_a broadcast over
    channels."""
    return (weight * (target.float() - prediction.float())).pow(2).mean()


def released_code_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
    """HumanSD's released ``p_losses``: mean(W_a * (target - prediction)^2), W_a outside the
    square (``logvar`` is zero and not learned there, so the rest of that loss is this)."""
    return (weight * (target.float() - prediction.float()).pow(2)).mean()


def released_code_weight(
    heatmaps: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float,
    encode,
) -> torch.Tensor:
    """W of HumanSD's released code: heatmaps ``[B, J, h, w]`` -> the inverted count map,
    3 channels, bicubic to ``image_size``, ``encode``d unnormalised -> ``[B, 4, H/8, W/8]``.
    ``encode(images)`` must return a scaled posterior sample, as ``get_first_stage_encoding``."""
    counts = binary_weight_map(heatmaps, threshold, invert=True).repeat(1, 3, 1, 1)
    resized = F.interpolate(counts, size=image_size, mode="bicubic", align_corners=False)
    return encode(resized)


class HumanSD(PoseConditionedDiffusion):
    """Pose-image concatenation (``conv_in`` 4 -> 8, zero-initialised) with the heatmap-guided
    loss; batches carry ``body_keypoints`` ``[B, P, 17, 3]`` for the surrogate heatmaps.
    Sampling is the shared pose-conditioned sampler (guidance keeps the pose in both
    branches)."""

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
        channels_last: bool = False,
        perceptual: dict | None = None,
        build_node: Callable[[dict], torch.nn.Module] | None = None,
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
            channels_last=channels_last,
            perceptual=perceptual,
        )
        self.heatmap = as_config(HeatmapWeightConfig, heatmap)
        if self.heatmap.source == "network" and not self.heatmap.network:
            raise ValueError("heatmap.source='network' needs heatmap.network (target/params)")
        if self.heatmap.source == "network" and build_node is None:
            raise ValueError(
                "heatmap.source='network' needs build_node to build heatmap.network (the "
                "experiments layer passes it)"
            )
        self._build_node = build_node
        self.heatmap_network = None

    def setup(self, stage: str) -> None:
        # the loss needs the network; sampling does not, so a model loaded only to sample
        # (evaluation) never builds it (an mmpose network needs a compiled mmcv)
        if stage in ("fit", "validate"):
            self.build_heatmap_network()
        super().setup(stage)

    def build_heatmap_network(self) -> torch.nn.Module | None:
        """The frozen pose network of ``source="network"``, built on first use."""
        if self.heatmap.source == "network" and self.heatmap_network is None:
            self.heatmap_network = self._build_node(self.heatmap.network).to(self.device)
            self.freeze("heatmap_network")
        return self.heatmap_network

    @torch.no_grad()
    def heatmaps(self, batch: dict, prediction: torch.Tensor, noise: torch.Tensor):
        """H ``[B, J, h, w]``: the network on the decoded noise difference, or the surrogate."""
        if self.heatmap.source == "gt":
            size = self.image_size(batch)
            return surrogate_heatmaps(batch["body_keypoints"], size, self.heatmap)
        network = self.build_heatmap_network()
        difference = self.decode_latents(prediction.detach() - noise)
        return network(difference.to(next(network.parameters(), difference).dtype)).float()

    @torch.no_grad()
    def weight_map(
        self, batch: dict, prediction, noise, latents, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """W at latent resolution: ``[B, 1, h, w]`` (eq. 6) or ``[B, 4, h, w]`` (released)."""
        cfg = self.heatmap
        heat = self.heatmaps(batch, prediction, noise)
        if cfg.variant == "eq6":
            weight = binary_weight_map(heat, cfg.threshold, invert=False)
            return F.interpolate(weight, size=latents.shape[-2:], mode="area")
        return released_code_weight(
            heat,
            self.image_size(batch),
            cfg.threshold,
            lambda x: self.encode_images(x, sample=True, generator=generator),
        )

    def loss_terms(self, batch, output, latents, noise, timesteps, generator=None):
        prediction = output[:, :LATENT_CHANNELS]
        target = self.loss_target(latents, noise, timesteps)
        weight = self.weight_map(batch, prediction, noise, latents, generator)
        loss_fn = eq6_loss if self.heatmap.variant == "eq6" else released_code_loss
        return {
            "loss": loss_fn(prediction, target, 1 + self.heatmap.weight * weight),
            "loss_denoise": F.mse_loss(prediction.float(), target.float()).detach(),
            "heatmap_weight": weight.mean(),
        }
