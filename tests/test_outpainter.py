"""Stage 2: ControlNet start-up identity, the outpainter's inputs and loss, its data, and a
short training run through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.full_body_datamodule import COCO_FLIP, flip_people
from datamodules.schema import Person
from experiments.run import main
from lightning_modules.blending import BlendConfig
from lightning_modules.components import build_tiny_components
from lightning_modules.conditioning import ControlNetPoseConditioning
from lightning_modules.outpainter import Outpainter

ROOT = Path(__file__).resolve().parents[1]


def test_zero_convolutions_leave_the_base_prediction_unchanged():
    unet = build_tiny_components(seed=2).unet.eval()
    conditioning = ControlNetPoseConditioning()
    conditioning.attach(unet)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([50, 500])
    pose = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=text).sample
        controlled = conditioning.predict(unet, x, t, text, pose)
    torch.testing.assert_close(controlled, base, rtol=0, atol=0)


def _batch(n=2, res=64):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, 1, res, res)
    mask[..., 20:30, 10:20] = 1
    image = torch.rand(n, 3, res, res, generator=g) * 2 - 1
    return {
        "image": image,
        "pose_image": torch.rand(n, 3, res, res, generator=g),
        "hand_mask": mask,
        "canvas": image * mask,
        "caption": [f"person {i}" for i in range(n)],
    }


@pytest.mark.parametrize("canvas_input", ["inpainting_unet", "controlnet"])
def test_outpainter_channels_and_trainable_parts(canvas_input):
    model = Outpainter(components={"tiny": True}, canvas_input=canvas_input)
    assert model.conditioning.controlnet.config.in_channels == 9
    assert model.unet.config.in_channels == (9 if canvas_input == "inpainting_unet" else 4)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.conditioning.controlnet.parameters()}
    losses = model.losses(_batch(), train=True)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(
        p.grad is not None
        for p in model.conditioning.controlnet.parameters()
        if p.requires_grad and p.ndim > 1
    )


def test_inpainting_inputs_follow_the_sd_convention():
    model = Outpainter(components={"tiny": True})
    batch = _batch()
    paint, canvas_latents = model.inpaint_inputs(batch["canvas"], batch["hand_mask"], (8, 8))
    assert paint.shape == (2, 1, 8, 8) and canvas_latents.shape == (2, 4, 8, 8)
    # 1 = paint: everywhere except the hand cells (rows 20-29 -> latent 2.5-3.75)
    assert paint[0, 0, 0, 0] == 1 and paint[0, 0, 3, 1] < 1


def test_sample_shapes_and_determinism():
    model = Outpainter(components={"tiny": True})
    batch = _batch()
    kw = dict(num_inference_steps=3, guidance_scale=2.0, blend=BlendConfig(mode="sequential"))
    a = model.sample(
        batch["pose_image"],
        batch["canvas"],
        batch["hand_mask"],
        batch["caption"],
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    b = model.sample(
        batch["pose_image"],
        batch["canvas"],
        batch["hand_mask"],
        batch["caption"],
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    assert a.shape == (2, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flip_swaps_left_and_right():
    body = np.zeros((17, 3))
    body[:, 0] = np.arange(17) * 3.0
    body[:, 2] = 2
    left, right = np.full((21, 3), 1.0), np.full((21, 3), 2.0)
    (flipped,) = flip_people([Person((0, 0, 1, 1), body, left, right)], 100)
    assert flipped.body[5, 0] == 100 - body[6, 0]  # left shoulder <- mirrored right shoulder
    assert flipped.body[0, 0] == 100 - body[0, 0]
    assert np.array_equal(flipped.left_hand[:, 2], right[:, 2])
    assert sorted(COCO_FLIP) == list(range(17))


def test_train_outpaint_tiny_config_runs_and_checkpoints_without_the_frozen_unet(
    synthetic_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            str(ROOT / "experiments/outpaint/tiny.yaml"),
            str(ROOT / "experiments/debug/limit.yaml"),
            f"data.params.train_shards={synthetic_dir}/train-*.tar",
            f"data.params.val_shards={synthetic_dir}/val-*.tar",
            "data.params.num_workers=0",
            "data.params.body.resolution=64",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "callbacks.images.params.every_n_steps=3",
        ]
    )
    ckpt = torch.load(
        tmp_path / "logs/outpaint/tiny/version_0/checkpoints/last.ckpt", weights_only=False
    )
    assert ckpt["global_step"] == 6
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith("conditioning.controlnet.") for k in keys)


def test_frozen_unet_stays_in_eval_mode():
    model = Outpainter(components={"tiny": True})
    model.train()
    assert not model.unet.training and model.conditioning.controlnet.training
    trained = Outpainter(components={"tiny": True}, train_unet=True).train()
    assert trained.unet.training
