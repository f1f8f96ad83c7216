"""The hand generator's equations: widened UNet, mask loss, combined loss, sampling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components import build_tiny_components
from lightning_modules.hand_generator import HandGenerator, mask_loss
from lightning_modules.unet_surgery import widen_conv_in, widen_conv_out


def _unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 900]),
        torch.randn(batch, 77, 32, generator=g),
    )


def test_zero_initialised_channels_keep_the_base_prediction():
    base = build_tiny_components(seed=1).unet.eval()
    # give the base conv weights non-trivial values so "unchanged" is not a coincidence
    wide = widen_conv_out(widen_conv_in(copy.deepcopy(base), 8), 5).eval()
    latents, t, text = _unet_inputs()
    pose = torch.randn(2, 4, 8, 8) * 3  # any pose latent: its weights are zero
    with torch.no_grad():
        expected = base(latents, t, encoder_hidden_states=text).sample
        out = wide(torch.cat([latents, pose], 1), t, encoder_hidden_states=text).sample
    assert out.shape == (2, 5, 8, 8)
    torch.testing.assert_close(out[:, :4], expected, rtol=0, atol=0)
    assert torch.count_nonzero(out[:, 4]) == 0  # mask logit starts at exactly 0
    assert wide.config.in_channels == 8 and wide.config.out_channels == 5


def test_widening_is_idempotent_and_refuses_to_narrow():
    unet = build_tiny_components().unet
    widen_conv_in(unet, 8)
    weight = unet.conv_in.weight.clone()
    widen_conv_in(unet, 8)
    assert torch.equal(unet.conv_in.weight, weight)
    with pytest.raises(ValueError, match="narrow"):
        widen_conv_in(unet, 4)


def test_mask_loss_matches_the_formula_by_hand():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # sigmoid(0, 2, -1, 4) = 0.5, 0.880797, 0.268941, 0.982014
    by_hand = ((1 - 0.5) ** 2 + 0.880797**2 + 0.268941**2 + (1 - 0.982014) ** 2) / 4
    assert by_hand == pytest.approx(0.274614, abs=1e-6)
    assert mask_loss(logits, mask).item() == pytest.approx(by_hand, rel=1e-5)


def _batch(size=64, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 16:48, 8:40] = 1
    return {
        "image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "pose_image": torch.rand(n, 3, size, size, generator=g),
        "mask": mask,
        "caption": [f"a photo of hand number {i}" for i in range(n)],
    }


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_total_loss_is_denoising_plus_weighted_mask_loss(weight):
    model = HandGenerator(components={"tiny": True}, mask_loss_weight=weight)
    batch = _batch()
    losses = model.losses(batch, train=False, generator=torch.Generator().manual_seed(0))
    expected = losses["loss_denoise"] + weight * losses["loss_mask"]
    torch.testing.assert_close(losses["loss"], expected)
    # recompute both terms from the model outputs with the same noise
    g = torch.Generator().manual_seed(0)
    latents = model.encode_images(batch["image"], generator=g)
    noise, t, noisy = model.add_noise(latents, g)
    eps, logits = model(
        noisy, t, model.encode_prompts(batch["caption"]), model.encode_pose(batch["pose_image"])
    )
    target = F.interpolate(batch["mask"], size=(8, 8), mode="area")
    torch.testing.assert_close(losses["loss_denoise"], F.mse_loss(eps, noise))
    torch.testing.assert_close(losses["loss_mask"], ((target - torch.sigmoid(logits)) ** 2).mean())


def test_v_prediction_target_follows_the_scheduler():
    model = HandGenerator(components={"tiny": True})
    model.noise_scheduler.register_to_config(prediction_type="v_prediction")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    abar = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * latents  # Salimans & Ho 2022
    assert model.denoising_loss(v, latents, noise, t).item() == pytest.approx(0.0, abs=1e-10)
    assert model.denoising_loss(noise, latents, noise, t).item() > 0.1


def test_min_snr_weighting():
    model = HandGenerator(components={"tiny": True}, snr_gamma=5.0)
    latents, noise = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    pred = torch.ones(2, 4, 8, 8)  # per-sample MSE = 1
    t = torch.tensor([10, 990])
    abar = model.noise_scheduler.alphas_cumprod[t]
    snr = abar / (1 - abar)
    expected = (torch.clamp(snr, max=5.0) / snr).mean()
    assert model.denoising_loss(pred, latents, noise, t).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_frozen_parts_stay_frozen_and_in_eval_mode(tiny_generator):
    tiny_generator.train()
    assert not tiny_generator.vae.training and not tiny_generator.text_encoder.training
    assert tiny_generator.unet.training
    assert not any(p.requires_grad for p in tiny_generator.vae.parameters())
    assert not any(p.requires_grad for p in tiny_generator.text_encoder.parameters())
    trainable = {id(p) for p in tiny_generator.trainable_parameters()}
    assert trainable == {id(p) for p in tiny_generator.unet.parameters()}


def test_an_exported_unet_is_trained_in_train_mode(tmp_path):
    # from_pretrained returns eval-mode modules; training one in eval mode would go unnoticed
    build_tiny_components().unet.save_pretrained(tmp_path / "unet")
    model = HandGenerator(components={"tiny": True, "unet": str(tmp_path / "unet")})
    assert model.unet.training and all(m.training for m in model.unet.modules())
    assert not model.vae.training and not model.text_encoder.training


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_sample_shapes_ranges_and_determinism(tiny_generator, scheduler):
    batch = _batch(n=2)
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, scheduler=scheduler)
    images, masks = tiny_generator.sample(
        batch["pose_image"], batch["caption"], generator=torch.Generator().manual_seed(7), **kwargs
    )
    again, _ = tiny_generator.sample(
        batch["pose_image"], batch["caption"], generator=torch.Generator().manual_seed(7), **kwargs
    )
    other, _ = tiny_generator.sample(
        batch["pose_image"], batch["caption"], generator=torch.Generator().manual_seed(8), **kwargs
    )
    assert images.shape == (2, 3, 64, 64) and masks.shape == (2, 1, 64, 64)
    assert images.min() >= 0 and images.max() <= 1
    assert masks.min() >= 0 and masks.max() <= 1
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    assert not torch.equal(images, other)


def test_guidance_combines_conditional_and_unconditional(tiny_generator):
    from lightning_modules.sampling import denoise

    calls = []

    def predict(x, t):
        calls.append(x.shape[0])
        half = x.shape[0] // 2
        return torch.cat([torch.zeros_like(x[:half]), torch.ones_like(x[half:])])

    scheduler = tiny_generator.sampling_scheduler("ddim")
    out_guided = denoise(scheduler, predict, torch.zeros(1, 4, 2, 2), 1, 3.0)
    # one DDIM step from t with eps = 0 + 3 * (1 - 0) = 3 on x = 0
    t = scheduler.timesteps[0]
    abar = scheduler.alphas_cumprod[t]
    abar_prev = scheduler.final_alpha_cumprod
    x0 = (0 - (1 - abar).sqrt() * 3) / abar.sqrt()
    expected = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * 3
    assert calls == [2]
    torch.testing.assert_close(out_guided, torch.full((1, 4, 2, 2), float(expected)))


def test_overfits_one_fixed_batch():
    torch.manual_seed(0)
    model = HandGenerator(components={"tiny": True}, caption_dropout=0.0)
    batch = _batch(n=4, seed=1)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    model.train()
    fixed = torch.Generator()
    history = []
    for step in range(60):
        fixed.manual_seed(step % 4)  # a few fixed (noise, t) draws: a finite training set
        loss = model.losses(batch, train=True, generator=fixed)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    first, last = sum(history[:4]) / 4, sum(history[-4:]) / 4
    print(f"overfit: first {first:.4f} last {last:.4f}")
    assert last < 0.5 * first, (first, last)
