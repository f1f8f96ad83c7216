"""HumanSD's heatmap-guided loss, the ControlNet pose baseline, plain SD, and every tiny
experiment config under fast_dev_run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.run import main
from lightning_modules.humansd import (
    HumanSD,
    binary_weight_map,
    gaussian_heatmaps,
    weighted_denoising_loss,
)
from lightning_modules.pose_conditioned import PoseConditionedDiffusion

ROOT = Path(__file__).resolve().parents[1]


def test_weighting_by_hand():
    lam = 0.1
    pred = torch.zeros(1, 4, 4, 4)
    target = torch.ones(1, 4, 4, 4)
    target[..., 2:, :] = 3.0  # squared error 1 in rows 0-1, 9 in rows 2-3
    marked = torch.zeros(1, 1, 4, 4)
    marked[..., :, :2] = 1  # the left half is "pose region"
    weight = 1 + lam * marked
    # left half: 1.1 * (1 + 9) / 2 ; right half: 1.0 * (1 + 9) / 2 ; mean over both halves
    expected = (1.1 * 5 + 1.0 * 5) / 2
    assert weighted_denoising_loss(pred, target, weight).item() == pytest.approx(expected)
    assert weighted_denoising_loss(pred, target, torch.ones(1, 1, 4, 4)).item() == 5.0


def test_gaussian_heatmaps_peak_on_labelled_keypoints_only():
    kp = torch.zeros(1, 2, 17, 3)
    kp[0, 0, 0] = torch.tensor([10.5, 20.5, 2])  # nose of person 0 at pixel (10, 20)
    kp[0, 1, 0] = torch.tensor([40.5, 5.5, 2])  # nose of person 1
    kp[0, 1, 5] = torch.tensor([30.5, 30.5, 0])  # unlabelled: no peak
    heat = gaussian_heatmaps(kp, (48, 64), sigma=2.0)
    assert heat.shape == (1, 17, 48, 64)
    assert heat[0, 0, 20, 10] == pytest.approx(1.0) and heat[0, 0, 5, 40] == pytest.approx(1.0)
    assert heat[0, 0, 20, 12] == pytest.approx(torch.exp(torch.tensor(-0.5)).item(), rel=1e-5)
    assert heat[0, 5].max() == 0 and heat[0, 1].max() == 0


def test_paper_and_code_binarisation_are_complements():
    heat = torch.rand(2, 17, 8, 8)
    paper = binary_weight_map(heat, 0.05, invert=False)
    code = binary_weight_map(heat, 0.05, invert=True)
    assert torch.equal(paper + code, torch.full_like(paper, 17.0))
    assert torch.equal(paper, (heat > 0.05).float().sum(1, keepdim=True))


def _batch(n=2, res=64):
    g = torch.Generator().manual_seed(0)
    kp = torch.zeros(n, 2, 17, 3)
    kp[:, 0, :, :2] = torch.rand(n, 17, 2, generator=g) * res
    kp[:, 0, :, 2] = 2
    return {
        "image": torch.rand(n, 3, res, res, generator=g) * 2 - 1,
        "pose_image": torch.rand(n, 3, res, res, generator=g),
        "body_keypoints": kp,
        "caption": ["a person"] * n,
    }


def test_humansd_loss_is_the_weighted_formula():
    model = HumanSD(components={"tiny": True}, heatmap={"weight": 0.5})
    batch = _batch()
    losses = model.losses(batch, train=False, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    latents = model.encode_images(batch["image"], generator=g)
    noise, t, noisy = model.add_noise(latents, g)
    eps = model(
        noisy, t, model.encode_prompts(batch["caption"]), model.encode_pose(batch["pose_image"])
    )
    heat = gaussian_heatmaps(batch["body_keypoints"], (64, 64), 2.0)
    w = torch.nn.functional.interpolate(
        (heat > 0.05).float().sum(1, keepdim=True), size=(8, 8), mode="area"
    )
    expected = ((1 + 0.5 * w) * (noise - eps) ** 2).mean()
    torch.testing.assert_close(losses["loss"], expected)
    assert losses["heatmap_weight"] > 0
    assert model.unet.config.in_channels == 8  # pose latent concatenated


class RecordingHeatmapNet(torch.nn.Module):
    """A stand-in pose network: records its input, returns heatmaps of its brightness."""

    def __init__(self, joints: int = 3):
        super().__init__()
        self.joints = joints
        self.seen = []

    def forward(self, images):
        self.seen.append(images)
        return images.mean(1, keepdim=True).expand(-1, self.joints, -1, -1)


def test_network_heatmaps_run_on_the_decoded_noise_difference(monkeypatch):
    net = RecordingHeatmapNet()
    monkeypatch.setattr("experiments.config.instantiate", lambda node: net)
    model = HumanSD(
        components={"tiny": True},
        heatmap={"source": "network", "network": {"target": "x"}, "variant": "code"},
    )
    losses = model.losses(_batch(), train=True)
    (seen,) = net.seen
    assert seen.shape == (2, 3, 64, 64) and seen.min() >= 0 and seen.max() <= 1
    assert torch.isfinite(losses["loss"])
    with pytest.raises(ValueError, match=r"heatmap\.network"):
        HumanSD(components={"tiny": True}, heatmap={"source": "network"})


def test_controlnet_baseline_trains_only_the_controlnet_and_scales():
    model = PoseConditionedDiffusion(
        components={"tiny": True}, conditioning="controlnet", train_unet=False
    )
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.conditioning.controlnet.parameters()}
    # give the zero convolutions weights, then scale 0 must give the bare UNet again
    for conv in model.conditioning.controlnet.controlnet_down_blocks:
        torch.nn.init.normal_(conv.weight)
    batch = _batch()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 800])
    text = model.encode_prompts(batch["caption"])
    with torch.no_grad():
        bare = model.unet(x, t, encoder_hidden_states=text).sample
        model.conditioning.conditioning_scale = 0.0
        scaled_off = model(x, t, text, batch["pose_image"])
        model.conditioning.conditioning_scale = 1.0
        on = model(x, t, text, batch["pose_image"])
    torch.testing.assert_close(scaled_off, bare)
    assert not torch.allclose(on, bare)


def test_plain_sd_ignores_the_pose():
    model = PoseConditionedDiffusion(components={"tiny": True}, conditioning="none")
    poses = torch.rand(2, 3, 64, 64)
    kw = dict(num_inference_steps=2, guidance_scale=2.0)
    a = model.sample(poses, ["x", "y"], generator=torch.Generator().manual_seed(0), **kw)
    b = model.sample(
        torch.zeros_like(poses), ["x", "y"], generator=torch.Generator().manual_seed(0), **kw
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.unet.config.in_channels == 4


TINY = [
    "hand/tiny",
    "outpaint/tiny",
    "humansd/tiny",
    "humansd/tiny_code_loss",
    "controlnet/tiny",
    "plain_sd/tiny",
]


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_fast_dev_run(name, synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = main(
        [
            "fit",
            str(ROOT / f"experiments/{name}.yaml"),
            str(ROOT / "experiments/debug/fast_dev_run.yaml"),
            f"data.params.train_shards={synthetic_dir}/train-*.tar",
            f"data.params.val_shards={synthetic_dir}/val-*.tar",
            "data.params.num_workers=0",
            "data.params.batch_size=2",
        ]
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
