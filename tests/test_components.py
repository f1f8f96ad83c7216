"""Tiny components mirror SD's architecture; the offline tokenizer matches CLIP's ids."""

from __future__ import annotations

import open_clip
import pytest
import torch

from lightning_modules.components import (
    ComponentsConfig,
    build_tiny_components,
    clip_tokenizer,
    load_components,
)


@pytest.mark.parametrize("text", ["a photo of a man raising the left hand", "Hello, World! 12"])
def test_tokenizer_ids_match_open_clip(text):
    ids = clip_tokenizer()(text).input_ids
    reference = open_clip.tokenize([text])[0]
    assert ids == reference[reference > 0].tolist()
    assert ids[0] == 49406 and ids[-1] == 49407


def test_tiny_components_have_sd_shapes():
    parts = build_tiny_components()
    assert parts.vae.config.latent_channels == 4
    assert 2 ** (len(parts.vae.config.block_out_channels) - 1) == 8  # SD's x8 downsampling
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size
    latents = parts.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 8, 8)
    assert parts.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_pretrained_is_required_without_tiny():
    with pytest.raises(ValueError, match=r"components\.pretrained is required"):
        load_components(ComponentsConfig())
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_components(ComponentsConfig(pretrained="./weights/sd15"))


@pytest.mark.gpu
def test_bf16_mixed_training_step_on_cuda():
    import lightning as L

    from lightning_modules.hand_generator import HandGenerator

    model = HandGenerator(components={"tiny": True})
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
    )
    model.trainer = trainer
    model.setup("fit")
    model.cuda()
    assert model.vae.dtype == torch.bfloat16 and model.text_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    batch = {
        "image": torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1,
        "pose_image": torch.rand(2, 3, 64, 64, device="cuda"),
        "mask": torch.ones(2, 1, 64, 64, device="cuda"),
        "caption": ["a hand", "a hand"],
    }
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.losses(batch, train=True)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_from_pretrained_path_loads_a_diffusers_folder(tmp_path):
    parts = build_tiny_components(seed=3)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "noise_scheduler"):
        getattr(parts, name).save_pretrained(
            tmp_path / ("scheduler" if name == "noise_scheduler" else name)
        )
    loaded = load_components(ComponentsConfig(pretrained=str(tmp_path)))
    for name in ("unet", "vae", "text_encoder"):
        for (k, a), b in zip(
            getattr(parts, name).state_dict().items(),
            getattr(loaded, name).state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b), (name, k)
    assert loaded.tokenizer("a hand").input_ids == parts.tokenizer("a hand").input_ids
    assert loaded.noise_scheduler.config.beta_end == 0.012


def test_an_uncached_hub_id_fails_in_seconds_with_the_reason(monkeypatch, tmp_path):
    import time

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache and HF_HUB_"):
        load_components(ComponentsConfig(pretrained="someone/sd15"))
    # online mode, hub unreachable (nothing listens on port 9): one line, within seconds
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"the hub \(http://127.0.0.1:9\) is unreachable"):
        load_components(ComponentsConfig(pretrained="someone/sd15"))
    assert time.monotonic() - start < 10


def test_empty_tokenizer_folder_is_an_error(tmp_path):
    parts = build_tiny_components()
    for name in ("unet", "vae", "text_encoder"):
        getattr(parts, name).save_pretrained(tmp_path / name)
    parts.noise_scheduler.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "tokenizer").mkdir()
    # transformers 5 returns an empty tokenizer here instead of raising
    with pytest.raises(FileNotFoundError, match="tokenizer/ has no vocabulary"):
        load_components(ComponentsConfig(pretrained=str(tmp_path)))


def test_a_pretrained_controlnet_is_trained_in_train_mode(tmp_path):
    from diffusers import ControlNetModel

    from lightning_modules.conditioning import ControlNetPoseConditioning

    unet = build_tiny_components().unet
    ControlNetModel.from_unet(unet).save_pretrained(tmp_path / "controlnet")
    conditioning = ControlNetPoseConditioning(pretrained=str(tmp_path / "controlnet"))
    conditioning.attach(unet)
    assert all(m.training for m in conditioning.controlnet.modules())
