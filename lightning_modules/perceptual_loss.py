"""Mask-aware perceptual and face loss on the one-step estimate x̂₀ (the "Masked LDM" course
project on ControlNet/SD 1.5, code at AbhinavGupta121/Masked_LDM), a loss any method can add:

    L = λ1·L_lpips + λ2·L_face + (1 − λ1 − λ2)·L_LDM          for t ≤ T
    L = L_LDM                                                  for t > T

x̂₀ = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t (ε-prediction; √ᾱ_t·z_t − √(1−ᾱ_t)·v̂ for v-prediction) is
decoded by the frozen VAE with gradients flowing through the decoder into the trained weights
(the reference decodes under ``no_grad``, so its perceptual terms never reached the model),
clamped to [−1, 1]. L_lpips: spatial LPIPS (VGG) between x̂₀ and the real image, averaged over
the region mask (people, or hands for the hand generator), as the reference's
``Masked_LPIPS_Loss``. L_face: Σ_l α_l·mean|FE_l(ĉ) − FE_l(c)| over face crops, FE a face
network's feature maps (the reference: a VGGFace2 ResNet-50, conv1 and layers 1-4). An image
without a face (or a region) moves that term's weight to the others in proportion, so the
weights still sum to 1 (the reference renormalises λ1 with the already-renormalised λ3).
The reference draws one t per batch; here each sample has its own t unless
``timestep_sampling="per_batch"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# the reference's face-feature weights for conv1, layer1, layer2, layer3, layer4
REFERENCE_FACE_WEIGHTS = (0.1, 0.25 * 0.01, 0.25 * 0.1, 0.25 * 0.2, 0.25 * 0.02)


@dataclass
class PerceptualLossConfig:
    lpips_weight: float = 0.2  # λ1 (reported best: 0.2)
    face_weight: float = 0.5  # λ2 (reported best: 0.5; 0 turns the face term off)
    max_timestep: int = 100  # T: samples with t <= T get the perceptual terms
    timestep_sampling: Literal["per_sample", "per_batch"] = "per_sample"
    region: Literal["person", "hand"] = "person"
    face_size: int = 112  # px the face crops are resized to
    face_layer_weights: Sequence[float] = field(default=REFERENCE_FACE_WEIGHTS)
    decoder_checkpointing: bool = True  # recompute the decoder's blocks one by one in backward
    # "pretrained": LPIPS on vgg_weights and the face ResNet-50 on face_weights (both local
    # files); "tiny": small seeded random networks (tests and the tiny configs only)
    networks: Literal["pretrained", "tiny"] = "pretrained"
    vgg_weights: str | None = None  # torchvision vgg16 state dict (.safetensors or .pth)
    face_weights: str | None = None  # ResNet-50 face network state dict

    def __post_init__(self):
        if self.networks == "pretrained" and self.vgg_weights is None:
            raise ValueError("perceptual.vgg_weights: a local VGG16 state dict (or networks: tiny)")
        if self.networks == "pretrained" and self.face_weight > 0 and self.face_weights is None:
            raise ValueError(
                "perceptual.face_weights: a local face ResNet-50 state dict (or face_weight: 0)"
            )
        if (
            self.lpips_weight < 0
            or self.face_weight < 0
            or self.lpips_weight + self.face_weight > 1
        ):
            raise ValueError(
                f"lpips_weight={self.lpips_weight}, face_weight={self.face_weight}: each >= 0 "
                "and their sum <= 1 (the denoising loss gets the rest)"
            )


def one_step_x0(
    noisy: torch.Tensor,
    prediction: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The clean latent the model predicts in one step, ``[B, 4, h, w]``, from ``z_t`` and the
    model output (DDPM, Ho et al. 2020, eq. 15; v-prediction, Salimans & Ho 2022)."""
    a = alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return (noisy - (1 - a).sqrt() * prediction) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * prediction
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def loss_weights(
    lpips_weight: float, face_weight: float, has_region: torch.Tensor, has_face: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(w_lpips, w_face, w_ldm)`` ``[B]``: (λ1, λ2, 1 − λ1 − λ2) where both terms
    exist; a missing term's weight is given to the present ones in proportion to theirs, so
    every sample's weights sum to 1 (no face: λ1/(λ1+λ3), 0, λ3/(λ1+λ3))."""
    ldm = 1 - lpips_weight - face_weight
    w = torch.stack(
        [
            has_region.float() * lpips_weight,
            has_face.float() * face_weight,
            torch.full(has_region.shape, ldm, device=has_region.device),
        ]
    )
    total = w.sum(0).clamp_min(1e-12)
    return tuple(w / total)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of a map ``[B, 1, H, W]`` over a mask ``[B, 1, H, W]`` (0 where empty)."""
    mask = F.interpolate(mask.float(), size=values.shape[-2:], mode="area")
    total = (values * mask).sum((1, 2, 3))
    return total / mask.sum((1, 2, 3)).clamp_min(1e-6)


def crop_resized(images: torch.Tensor, boxes: list[tuple], size: int) -> torch.Tensor:
    """Crops ``(image index, box x0, y0, x1, y1)`` of ``images`` ``[B, 3, H, W]`` resized to
    ``size`` (bilinear, differentiable) -> ``[N, 3, size, size]``."""
    crops = []
    for b, x0, y0, x1, y1 in boxes:
        crop = images[
            b : b + 1, :, int(y0) : max(int(y1), int(y0) + 1), int(x0) : max(int(x1), int(x0) + 1)
        ]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(crops) if crops else images.new_zeros(0, 3, size, size)


def face_distance(
    features: Callable[[torch.Tensor], list[torch.Tensor]],
    generated: torch.Tensor,
    real: torch.Tensor,
    weights: Sequence[float],
) -> torch.Tensor:
    """Σ_l α_l · mean |FE_l(generated) − FE_l(real)| per crop pair ``[N]`` (the reference's
    distance: L1 averaged over channels and positions)."""
    fake, true = features(generated), features(real.detach())
    if len(fake) != len(weights):
        raise ValueError(
            f"the face network gave {len(fake)} feature maps for {len(weights)} weights"
        )
    return sum(
        a * (f - t).abs().mean((1, 2, 3)) for a, f, t in zip(weights, fake, true, strict=True)
    )


class PerceptualLoss(nn.Module):
    """The loss terms on decoded one-step estimates. ``lpips``: a network returning a spatial
    distance map ``[B, 1, H, W]`` for two images in [−1, 1] (``lpips.LPIPS(spatial=True)``);
    ``face_features``: a network returning a list of feature maps for face crops in [−1, 1]
    (None: no face term)."""

    def __init__(
        self,
        config: PerceptualLossConfig,
        lpips: nn.Module,
        face_features: nn.Module | None = None,
    ):
        super().__init__()
        self.config = config
        self.lpips = lpips.requires_grad_(False).eval()
        self.face_features = (
            face_features.requires_grad_(False).eval() if face_features is not None else None
        )

    def timesteps(self, batch_size: int, num_train_timesteps: int, generator=None) -> torch.Tensor:
        """Training timesteps ``[B]``: one each, or one for the batch (the reference)."""
        n = 1 if self.config.timestep_sampling == "per_batch" else batch_size
        t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
        return t.expand(batch_size).clone()

    def forward(
        self,
        decoded: torch.Tensor,
        real: torch.Tensor,
        region: torch.Tensor,
        faces: list[tuple[int, int, int, int, int]],
    ) -> dict[str, torch.Tensor]:
        """Per-sample terms ``[B]`` for decoded x̂₀ and real images ``[B, 3, H, W]`` in [−1, 1],
        the region mask ``[B, 1, H, W]`` and face boxes ``(image, x0, y0, x1, y1)`` px."""
        b = decoded.shape[0]
        lpips = masked_mean(self.lpips(decoded, real), region)
        face = decoded.new_zeros(b)
        has_face = torch.zeros(b, dtype=torch.bool, device=decoded.device)
        if self.face_features is not None and faces and self.config.face_weight > 0:
            size = self.config.face_size
            per_crop = face_distance(
                self.face_features, crop_resized(decoded, faces, size),
                crop_resized(real, faces, size), self.config.face_layer_weights,
            )  # fmt: skip
            owners = torch.tensor([f[0] for f in faces], device=decoded.device)
            face = face.index_add(0, owners, per_crop)
            has_face[owners] = True
        return {"lpips": lpips, "face": face, "has_face": has_face,
                "has_region": region.flatten(1).amax(1) > 0}  # fmt: skip
