"""HumanSD's heatmap-guided loss, the ControlNet pose baseline, plain SD, and every tiny
experiment config under fast_dev_run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.run import main
from lightning_modules.humansd import (
    HeatmapWeightConfig,
    HumanSD,
    binary_weight_map,
    eq6_loss,
    gaussian_heatmaps,
    released_code_loss,
    released_code_weight,
    surrogate_heatmaps,
)
from lightning_modules.pose_conditioned import PoseConditionedDiffusion
from lightning_modules.sampling import pose_and_text_guidance
from metrics.heatmap_networks import HeatmapNetwork, average_stages

ROOT = Path(__file__).resolve().parents[1]


def _error_and_marks():
    pred = torch.zeros(1, 4, 4, 4)
    target = torch.ones(1, 4, 4, 4)
    target[..., 2:, :] = 3.0  # error 1 in rows 0-1, 3 in rows 2-3
    marked = torch.zeros(1, 1, 4, 4)
    marked[..., :, :2] = 1  # the left half is "pose region"
    return pred, target, 1 + 0.1 * marked


def test_eq6_weights_inside_the_square():
    """||W_a (eps - eps_theta)||^2: left half (1.1 x 1)^2 and (1.1 x 3)^2, right half 1 and 9."""
    pred, target, weight = _error_and_marks()
    expected = ((1.21 * 1 + 1.21 * 9) / 2 + (1 + 9) / 2) / 2
    assert eq6_loss(pred, target, weight).item() == pytest.approx(expected)


def test_released_code_weights_outside_the_square():
    """W_a (eps - eps_theta)^2: left half 1.1 x 1 and 1.1 x 9, right half 1 and 9."""
    pred, target, weight = _error_and_marks()
    expected = ((1.1 * 1 + 1.1 * 9) / 2 + (1 + 9) / 2) / 2
    assert released_code_loss(pred, target, weight).item() == pytest.approx(expected)


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


def test_surrogate_weight_covers_the_image_at_512_px():
    """17 joints, far apart, at 512 px. H > 0.05 within d^2 < 2 sigma^2 ln 20 = 23.97 grid px^2
    of a joint on the 128-px grid: 69 grid pixels per joint centred on a pixel centre (counted
    lattice points), so the eq. 6 count map averages 17 x 69 / 128^2 = 0.0716 at any latent
    size, and mean W_a = 1 + 0.1 x 0.0716. (Gaussians of 2 image px, as before, gave 1.0005.)"""
    kp = torch.zeros(1, 1, 17, 3)
    for j in range(17):
        kp[0, 0, j] = torch.tensor([(j % 5) * 100 + 54.0, (j // 5) * 100 + 54.0, 2])
    config = HeatmapWeightConfig()
    heat = surrogate_heatmaps(kp, (512, 512), config)
    assert heat.shape == (1, 17, 128, 128)
    weight = torch.nn.functional.interpolate(
        binary_weight_map(heat, 0.05, invert=False), size=(64, 64), mode="area"
    )
    assert float(weight.mean()) == pytest.approx(17 * 69 / 128**2, rel=1e-6)
    assert float((1 + 0.1 * weight).mean()) == pytest.approx(1.00716, abs=1e-5)
    coverage = float((weight > 0).float().mean())
    assert 0.07 < coverage < 0.12  # 17 discs of ~17 latent cells, plus partial border cells
    # the same fraction of the image at 64 px
    small = surrogate_heatmaps(kp / torch.tensor([8.0, 8.0, 1.0]), (64, 64), config)
    torch.testing.assert_close(small, heat)


def test_released_code_weight_by_hand():
    """Two joints on a 2x2 heatmap grid, threshold 0.05: the inverted count map is 2 where both
    heatmaps are low, 1 where one fires, 0 where both do; it reaches the encoder unnormalised,
    3 channels, bicubically resized to the image size."""
    heat = torch.tensor([[[[0.9, 0.0], [0.04, 0.06]], [[0.9, 0.9], [0.0, 0.0]]]])
    counts = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    seen = []

    def encode(images):
        seen.append(images)
        return images[:, :1, ::4, ::4] * 0.5  # a stand-in "VAE": subsample and scale

    weight = released_code_weight(heat, (8, 8), 0.05, encode)
    (image,) = seen
    assert image.shape == (1, 3, 8, 8) and torch.equal(image[0, 0], image[0, 2])
    expected = torch.nn.functional.interpolate(
        counts[None, None], size=(8, 8), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(image[:, :1], expected)
    assert image.max() > 1.5  # not mapped to [-1, 1]
    torch.testing.assert_close(weight, expected[..., ::4, ::4] * 0.5)


def test_released_code_weight_encodes_a_posterior_sample():
    model = HumanSD(
        components={"tiny": True}, heatmap={"variant": "released_code", "heatmap_size": 16}
    )
    batch = _batch()
    prediction, noise = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    latents = torch.zeros(2, 4, 8, 8)
    a = model.weight_map(batch, prediction, noise, latents, torch.Generator().manual_seed(0))
    b = model.weight_map(batch, prediction, noise, latents, torch.Generator().manual_seed(0))
    c = model.weight_map(batch, prediction, noise, latents, torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


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


def test_humansd_eq6_loss_end_to_end():
    model = HumanSD(components={"tiny": True}, heatmap={"weight": 0.5, "heatmap_size": 32})
    batch = _batch()
    losses = model.losses(batch, train=False, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    latents = model.encode_images(batch["image"], generator=g)
    noise, t, noisy = model.add_noise(latents, g)
    eps = model(
        noisy, t, model.encode_prompts(batch["caption"]), model.encode_pose(batch["pose_image"])
    )
    kp = batch["body_keypoints"].clone()
    kp[..., :2] *= 0.5  # the 64 px image on the 32 px heatmap grid
    heat = gaussian_heatmaps(kp, (32, 32), 2.0)
    w = torch.nn.functional.interpolate(
        (heat > 0.05).float().sum(1, keepdim=True), size=(8, 8), mode="area"
    )
    expected = (((1 + 0.5 * w) * (noise - eps)) ** 2).mean()
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


def test_network_heatmaps_run_on_the_decoded_noise_difference():
    net = RecordingHeatmapNet()
    model = HumanSD(
        components={"tiny": True},
        heatmap={"source": "network", "network": {"target": "x"}, "variant": "released_code"},
        build_node=lambda node: net,
    )
    losses = model.losses(_batch(), train=True)
    (seen,) = net.seen
    assert seen.shape == (2, 3, 64, 64) and seen.min() >= 0 and seen.max() <= 1
    assert torch.isfinite(losses["loss"])
    with pytest.raises(ValueError, match=r"heatmap\.network"):
        HumanSD(components={"tiny": True}, heatmap={"source": "network"})


class TwoStageHeads(torch.nn.Module):
    """HigherHRNet-like outputs: heatmaps + tags at 1/4, heatmaps at 1/2 of the input."""

    def forward(self, images):
        b, _, h, w = images.shape
        quarter = torch.ones(b, 4, h // 4, w // 4)  # 2 joints + 2 tag maps
        half = torch.full((b, 2, h // 2, w // 2), 3.0)
        return [quarter, half]


def test_heatmap_network_averages_stages_at_the_last_size():
    net = HeatmapNetwork(TwoStageHeads())
    heat = net(torch.rand(1, 3, 16, 16))
    assert heat.shape == (1, 2, 8, 8)
    torch.testing.assert_close(heat, torch.full((1, 2, 8, 8), 2.0))  # (1 + 3) / 2
    tagged = average_stages((torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)))
    assert torch.equal(tagged, torch.ones(1, 2, 4, 4))
    normalized = HeatmapNetwork(RecordingHeatmapNet(1), normalize=True)
    normalized(torch.full((1, 3, 4, 4), 0.485))
    (seen,) = normalized.network.seen
    assert seen[0, 0].abs().max() < 1e-6  # (0.485 - mean) / std on the red channel


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
    "humansd/tiny_released_loss",
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


def test_pose_and_text_guidance_by_hand():
    neither, pose_only, both = torch.tensor(1.0), torch.tensor(3.0), torch.tensor(4.0)
    # 1 + 2 x (3 - 1) + 7.5 x (4 - 3)
    assert pose_and_text_guidance(neither, pose_only, both, 2.0, 7.5) == 12.5


def test_pose_dropout_and_pose_guidance_come_together():
    with pytest.raises(ValueError, match="pose_guidance_scale"):
        PoseConditionedDiffusion(components={"tiny": True}, pose_dropout=0.1)
    with pytest.raises(ValueError, match="pose_dropout > 0"):
        PoseConditionedDiffusion(components={"tiny": True}, sampler={"pose_guidance_scale": 2.0})


def test_pose_guidance_scale_1_is_text_guidance_with_the_pose_in_both_branches():
    torch.manual_seed(0)
    model = PoseConditionedDiffusion(
        components={"tiny": True}, pose_dropout=0.1, sampler={"pose_guidance_scale": 1.0}
    )
    with torch.no_grad():  # make the zero-initialised pose channels matter
        torch.nn.init.normal_(model.unet.conv_in.weight[:, 4:], std=0.5)
    poses, prompts = torch.rand(2, 3, 64, 64), ["x", "y"]
    kw = dict(num_inference_steps=2, guidance_scale=3.0)

    def sample():
        return model.sample(poses, prompts, generator=torch.Generator().manual_seed(0), **kw)

    three_branch = sample()
    model.sampler_config.pose_guidance_scale = None
    two_branch = sample()
    torch.testing.assert_close(three_branch, two_branch, rtol=0, atol=1e-5)
    model.sampler_config.pose_guidance_scale = 3.0
    assert (sample() - two_branch).abs().max() > 1e-3
