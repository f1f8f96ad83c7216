"""The mask-aware perceptual and face loss on tiny networks: the one-step estimate, the gate at
T, the terms by hand, the weights when an image has no face, the networks from local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.perceptual_loss import (
    PerceptualLossConfig,
    loss_weights,
    masked_mean,
    one_step_x0,
)
from lightning_modules.perceptual_networks import FaceFeatures, build_lpips, read_state_dict
from lightning_modules.pose_conditioned import PoseConditionedDiffusion

TINY = {"networks": "tiny", "max_timestep": 100}


def test_one_step_estimate_by_hand_and_back():
    model = PoseConditionedDiffusion({"tiny": True}, conditioning="none")
    scheduler = model.noise_scheduler
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    z = scheduler.add_noise(x0, eps, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    by_hand = (z - (1 - a).sqrt() * eps) / a.sqrt()
    estimate = one_step_x0(z, eps, t, scheduler.alphas_cumprod)
    assert torch.allclose(estimate, by_hand) and torch.allclose(estimate, x0, atol=1e-4)
    v = scheduler.get_velocity(x0, eps, t)
    assert torch.allclose(
        one_step_x0(z, v, t, scheduler.alphas_cumprod, "v_prediction"), x0, atol=1e-4
    )


def test_weights_move_to_the_present_terms_in_proportion():
    region, face = torch.tensor([True, True, False]), torch.tensor([True, False, False])
    w_lpips, w_face, w_ldm = loss_weights(0.2, 0.5, region, face)
    assert torch.allclose(torch.stack([w_lpips, w_face, w_ldm]), torch.tensor(
        [[0.2, 0.2 / 0.5, 0.0], [0.5, 0.0, 0.0], [0.3, 0.3 / 0.5, 1.0]]
    ))  # fmt: skip
    # the reference computes lambda1 / (lambda1 + lambda3') = 0.2 / 0.8 = 0.25 with no face
    assert float(w_lpips[1]) == pytest.approx(0.4) and float((w_lpips + w_face + w_ldm)[1]) == 1


def model_with(**perceptual) -> PoseConditionedDiffusion:
    torch.manual_seed(0)
    return PoseConditionedDiffusion(
        {"tiny": True}, conditioning="controlnet", train_unet=False,
        perceptual={**TINY, **perceptual},
    )  # fmt: skip


def full_body_batch(face: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1)
    body = torch.zeros(2, 1, 17, 3)
    body[:, 0, :, 0] = torch.linspace(16, 40, 17)
    body[:, 0, :, 1] = torch.linspace(8, 56, 17)
    body[:, 0, :, 2] = 2
    return {
        "image": torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1,
        "pose_image": torch.rand(2, 3, 64, 64, generator=gen),
        "caption": ["a person", "a person"],
        "body_keypoints": body,
    }


def test_no_perceptual_gradient_for_samples_above_t():
    model = model_with(face_weight=0.0)
    batch = full_body_batch()
    gen = torch.Generator().manual_seed(2)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    prediction = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    terms = model.with_perceptual(
        {"loss": torch.zeros(())}, batch, noisy, prediction, torch.tensor([50, 900])
    )
    terms["loss"].backward()
    assert prediction.grad[1].abs().max() == 0 and prediction.grad[0].abs().max() > 0
    assert float(terms["perceptual_fraction"]) == 0.5


def test_the_loss_equals_a_hand_computation_on_tiny_networks(monkeypatch):
    model = model_with(lpips_weight=0.2, face_weight=0.5)
    batch = full_body_batch()
    # one face in image 0, none in image 1: image 1's face weight goes to the others
    monkeypatch.setattr(model, "face_boxes", lambda images: [(0, 20, 8, 36, 24)])
    gen = torch.Generator().manual_seed(3)
    noisy, prediction = (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.randn(2, 4, 8, 8, generator=gen),
    )
    t = torch.tensor([30, 80])
    terms = model.with_perceptual({"loss": torch.tensor(2.0)}, batch, noisy, prediction, t)
    # by hand
    x0 = one_step_x0(noisy, prediction, t, model.noise_scheduler.alphas_cumprod)
    decoded = model.vae.decode(x0 / model.vae.config.scaling_factor).sample.clamp(-1, 1)
    real = batch["image"]
    region = torch.zeros(2, 1, 64, 64)
    # person box: keypoints x 16..40, y 8..56, 10 % margin -> x 13.6..42.4, y 3.2..60.8
    region[..., 3:61, 13:43] = 1
    lpips_map = model.perceptual.lpips(decoded, real)
    lpips = (lpips_map * region).sum((1, 2, 3)) / region.sum((1, 2, 3))

    def crop(image):
        face = image[:1, :, 8:24, 20:36]
        return torch.nn.functional.interpolate(
            face, size=(112, 112), mode="bilinear", align_corners=False
        )

    fake, true = (
        model.perceptual.face_features(crop(decoded)),
        model.perceptual.face_features(crop(real)),
    )
    alphas = (0.1, 0.0025, 0.025, 0.05, 0.005)
    face0 = sum(a * (f - r).abs().mean() for a, f, r in zip(alphas, fake, true, strict=True))
    # image 0: 0.2 lpips + 0.5 face + 0.3 ldm; image 1: 0.4 lpips + 0.6 ldm
    expected = (0.2 * lpips[0] + 0.5 * face0 + 0.4 * lpips[1]) / 2 + (0.3 + 0.6) / 2 * 2.0
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["lpips"]) == pytest.approx(float(lpips.mean()), rel=1e-5)


def test_masked_mean_ignores_what_is_outside_the_mask():
    values = torch.arange(16.0).view(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    assert float(masked_mean(values, mask)) == pytest.approx((0 + 1 + 4 + 5) / 4)


@pytest.mark.parametrize("sampling", ["per_sample", "per_batch"])
def test_timesteps_per_sample_or_one_per_batch(sampling):
    model = model_with(timestep_sampling=sampling)
    t = model.perceptual.timesteps(64, 1000, torch.Generator().manual_seed(0))
    assert t.shape == (64,) and (len(set(t.tolist())) == 1) == (sampling == "per_batch")


def test_hand_region_for_the_hand_generator():
    from lightning_modules.hand_generator import HandGenerator

    torch.manual_seed(0)
    model = HandGenerator(
        {"tiny": True},
        perceptual={**TINY, "region": "hand", "face_weight": 0.0, "max_timestep": 1000},
    )
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 20:40, 20:40] = 1
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "pose_image": torch.rand(2, 3, 64, 64),
             "caption": ["a hand", "a hand"], "mask": mask}  # fmt: skip
    assert torch.equal(model.region_mask(batch), mask)
    terms = model.losses(batch, train=True, generator=torch.Generator().manual_seed(0))
    assert {"lpips", "ldm", "loss_mask"} <= set(terms) and float(terms["face"]) == 0
    assert model.perceptual.face_features is None


def test_configs_refuse_missing_weights_and_bad_sums():
    with pytest.raises(ValueError, match="vgg_weights"):
        PerceptualLossConfig()
    with pytest.raises(ValueError, match="face_weights"):
        PerceptualLossConfig(vgg_weights="vgg.pth")
    with pytest.raises(ValueError, match="sum <= 1"):
        PerceptualLossConfig(networks="tiny", lpips_weight=0.6, face_weight=0.5)


def test_networks_load_local_weights_and_refuse_pickled_objects(tmp_path):
    from torchvision.models import vgg16

    vgg = vgg16()
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    lpips = build_lpips(str(tmp_path / "vgg16.pth"))
    assert torch.equal(lpips.net.slice3._modules["10"].weight, vgg.features[10].weight)
    tiny = FaceFeatures(tiny=True)
    torch.save(tiny.net.state_dict(), tmp_path / "face.pth")
    loaded = FaceFeatures(str(tmp_path / "face.pth"), tiny=True, seed=1)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(tiny(x), loaded(x), strict=True))
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "object.pth")
    with pytest.raises(ValueError, match="not a tensors-only state dict"):
        read_state_dict(str(tmp_path / "object.pth"), "face weights")


def test_mediapipe_finds_the_face_in_a_real_photo():
    from pose_estimation.mediapipe_faces import MediaPipeFaces

    photo = Path(__file__).parent / "data" / "real_photos" / "panoptic_ex2_2_000040_l.jpg"
    image = np.asarray(Image.open(photo).convert("RGB"))
    faces = MediaPipeFaces()
    ((x0, y0, x1, y1),) = faces(image)
    assert 150 < x0 < x1 < 240 and 30 < y0 < y1 < 110  # the person's head, upper middle
    assert faces(np.zeros((64, 64, 3), np.uint8)) == []


def test_humansd_heatmap_loss_with_the_perceptual_terms():
    """HumanSD's own loss (heatmap-weighted) is the L_LDM the perceptual terms join, and the
    LPIPS term's gradient reaches the trained UNet."""
    from lightning_modules.humansd import HumanSD

    torch.manual_seed(0)
    model = HumanSD(
        {"tiny": True},
        heatmap={"weight": 0.5, "heatmap_size": 32},
        perceptual={**TINY, "lpips_weight": 0.2, "face_weight": 0.0, "max_timestep": 1000},
    )
    terms = model.losses(full_body_batch(), train=True, generator=torch.Generator().manual_seed(4))
    assert {"heatmap_weight", "loss_denoise", "ldm", "lpips"} <= set(terms)
    assert float(terms["heatmap_weight"]) > 0 and float(terms["perceptual_fraction"]) == 1
    # every image has a person and no face: 0.2 LPIPS + 0.8 of HumanSD's loss
    expected = 0.2 * terms["lpips"] + 0.8 * terms["ldm"]
    assert float(terms["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    (0.2 * terms["lpips"]).backward()
    grads = [p.grad for p in model.unet.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0


def test_checkpointed_decoder_gives_the_same_gradient():
    grads = []
    for checkpointing in (False, True):
        model = model_with(face_weight=0.0, decoder_checkpointing=checkpointing)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        latents.requires_grad_(True)
        model.decode_with_grad(latents).pow(2).sum().backward()
        assert model.vae.decoder.gradient_checkpointing == checkpointing
        grads.append(latents.grad)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
