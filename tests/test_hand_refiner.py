"""HandRefiner on tiny models: the inpainting inputs, paste-back, any image size, seeds per
image, control strength, training only the ControlNet, the training data, the predictor's
reports and adaptive strength, the mesh-depth adapter and the harness's post-step wiring."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from datamodules.refiner_datamodule import RefinerDataConfig, people_hand_depths, refiner_example
from datamodules.schema import Person, decode_sample
from experiments.config import ConfigError
from experiments.evaluate import check_base_methods
from lightning_modules.blending import BlendConfig
from lightning_modules.hand_refiner import HandRefiner
from lightning_modules.refiner_predictor import RefinerPredictor
from pose_estimation.hand_depth import combine_hands, hand_depth
from tests.conftest import make_raw_sample

SAMPLER = {"scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 9.0}


@pytest.fixture(scope="module")
def refiner() -> HandRefiner:
    torch.manual_seed(0)
    module = HandRefiner({"tiny": True}, sampler=SAMPLER).eval()
    # a trained ControlNet: zero convolutions at 0 would make the depth irrelevant
    with torch.no_grad():
        for p in module.conditioning.controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def block_mask(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, height, width)
    mask[..., y0:y1, x0:x1] = 1
    return mask


def test_unet_takes_nine_channels_and_the_controlnet_the_noisy_latent_only(refiner):
    assert refiner.unet.config.in_channels == 9
    net = refiner.conditioning.controlnet
    assert net.config.in_channels == 4
    # built from the widened UNet and cut to its first 4 inputs: the latent's weights
    reference = ControlNetModel.from_unet(HandRefiner({"tiny": True}).unet)
    assert torch.equal(
        reference.conv_in.weight[:, :4],
        HandRefiner({"tiny": True}).conditioning.controlnet.conv_in.weight,
    )
    trained = {n.split(".")[0] for n, p in refiner.named_parameters() if p.requires_grad}
    assert trained == {"conditioning"}


def test_inpaint_inputs_mask_is_nearest_at_latent_size_and_masked_image_zero_inside(refiner):
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = block_mask(64, 64, 16, 32, 8, 40)  # cells rows 2-3, columns 1-4 at x8
    paint, _ = refiner.inpaint_inputs(images, mask, torch.Generator().manual_seed(0))
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 2:4, 1:5] = 1
    assert torch.equal(paint, expected)
    # the masked image the VAE encodes is source * (mask < 0.5): compare the posterior means
    masked = images * (1 - mask)
    mean = refiner.vae.encode(masked).latent_dist.mean * refiner.vae.config.scaling_factor
    _, latents = refiner.inpaint_inputs(images, mask, torch.Generator().manual_seed(0))
    std = refiner.vae.encode(masked).latent_dist.std * refiner.vae.config.scaling_factor
    assert torch.allclose(
        latents,
        mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)),
        atol=1e-5,
    )


@pytest.mark.parametrize("size", [(64, 64), (72, 100)])
def test_outside_the_mask_is_bit_identical_and_any_size_works(refiner, size):
    height, width = size
    images = (
        torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, height, width))).float()
        / 255
    )
    depth = torch.zeros(1, 1, height, width)
    depth[..., 20:40, 30:50] = 0.8
    mask = block_mask(height, width, 12, 48, 22, 58)
    out = refiner.refine(
        images, depth, mask, ["a hand"], generator=torch.Generator().manual_seed(1)
    )
    assert out.shape == images.shape
    outside = mask.expand_as(images) == 0
    assert torch.equal(out[outside], images[outside])
    assert (out[~outside] - images[~outside]).abs().max() > 0.05
    # and as saved: the PNG's bytes outside the mask are the input's
    to_uint8 = lambda t: t[0].mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()  # noqa: E731
    keep = outside[0, 0].numpy()
    assert np.array_equal(to_uint8(out)[keep], to_uint8(images)[keep])


def test_feathered_paste_back_ramps_inside_the_mask_only(refiner):
    images = torch.full((1, 3, 64, 64), 0.5)
    mask = block_mask(64, 64, 8, 56, 8, 56)
    depth = mask * 0.9
    out = refiner.refine(
        images, depth, mask, ["x"], generator=torch.Generator().manual_seed(0), feather=8
    )
    assert torch.equal(out[..., :8, :], images[..., :8, :])
    # one pixel inside the border the alpha is about 1/8: close to the input
    edge = (out[..., 8, 30] - 0.5).abs().max()
    centre = (out[..., 32, 32] - 0.5).abs().max()
    assert edge < centre


def test_seeds_are_per_image_and_batching_does_not_change_results(refiner):
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.random((2, 3, 64, 64))).float()
    depth = block_mask(64, 64, 16, 48, 16, 48).repeat(2, 1, 1, 1) * 0.7
    mask = block_mask(64, 64, 8, 56, 8, 56).repeat(2, 1, 1, 1)
    gens = lambda *s: [torch.Generator().manual_seed(x) for x in s]  # noqa: E731
    both = refiner.refine(images, depth, mask, ["a", "b"], generator=gens(3, 4))
    alone = refiner.refine(images[1:], depth[1:], mask[1:], ["b"], generator=gens(4))
    assert torch.allclose(both[1:], alone, atol=1e-5)
    again = refiner.refine(images, depth, mask, ["a", "b"], generator=gens(3, 4))
    assert torch.equal(both, again)


def test_strength_scales_the_depth_controlnet(refiner):
    images = torch.full((1, 3, 64, 64), 0.4)
    mask = block_mask(64, 64, 8, 56, 8, 56)
    flat, bumpy = mask * 1.0, mask * torch.linspace(0.2, 1, 64)

    def run(d, s):
        return refiner.refine(
            images, d, mask, ["x"], strength=s, generator=torch.Generator().manual_seed(0)
        )

    # at strength 0 the ControlNet's residuals are multiplied by 0: the depth cannot matter
    assert torch.allclose(run(flat, 0.0), run(bumpy, 0.0), atol=1e-6)
    assert not torch.allclose(run(flat, 1.0), run(bumpy, 1.0), atol=1e-3)
    # trained at full strength as released; 0.55 is the sampling default
    assert refiner.conditioning.conditioning_scale == 1.0 and refiner.strength == 0.55


def test_training_step_gives_gradients_to_the_controlnet_only():
    module = HandRefiner({"tiny": True}, sampler=SAMPLER)
    batch = {
        "image": torch.rand(2, 3, 64, 64) * 2 - 1,
        "hand_mask": block_mask(64, 64, 8, 40, 8, 40).repeat(2, 1, 1, 1),
        "depth": block_mask(64, 64, 16, 32, 16, 32).repeat(2, 1, 1, 1),
        "caption": ["a hand", "two hands"],
    }
    loss = module.losses(batch, train=True, generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    with_grad = {n.split(".")[0] for n, p in module.named_parameters() if p.grad is not None}
    assert with_grad == {"conditioning"} and torch.isfinite(loss)


def test_combine_hands_draws_the_nearer_hand_last_and_unites_masks():
    kp = np.zeros((21, 3))
    kp[:, 0], kp[:, 1] = np.linspace(10, 30, 21), np.linspace(10, 30, 21)
    near, far = kp.copy(), kp.copy()
    near[:, 2], far[:, 2] = -5.0, 5.0  # z at keypoint 9 orders them
    far[:, 0] += 2
    h_near = hand_depth(near, "left", (64, 64), min_padding=2)
    h_far = hand_depth(far, "right", (64, 64), min_padding=2)
    h_far.depth[h_far.depth > 0] = 0.5  # tell them apart
    depth, mask = combine_hands([h_near, h_far], (64, 64))
    both = (h_near.depth > 0) & (h_far.depth > 0)
    assert both.any() and np.all(depth[both] == h_near.depth[both])
    assert np.array_equal(mask, h_near.mask | h_far.mask)


def synthetic_sample(hand: list | None, size: int = 64):
    raw = make_raw_sample(size=size)
    record = json.loads(raw["json"])
    record["people"][0]["right_hand"] = hand
    raw["json"] = json.dumps(record).encode()
    return decode_sample(raw, min_image_size=32)


def test_training_example_mask_and_depth_follow_the_keypoints_and_flip_with_the_image():
    hand = [[20 + (i % 5) * 4, 20 + (i // 5) * 4, 2] for i in range(21)]  # x 20-36, y 20-36
    config = RefinerDataConfig(resolution=64, min_padding=5, flip_prob=1.0)
    sample = synthetic_sample(hand)
    (plain,) = refiner_example(sample, False, random.Random(0), config)
    (flipped,) = refiner_example(sample, True, random.Random(0), config)
    mask = plain["hand_mask"][0].numpy() > 0
    rows, cols = np.nonzero(mask)
    # keypoints span 20..36 (17 px): padding max(5, int(17 * 0.15)) = 5, depth reaches further
    assert cols.min() <= 15 and rows.min() <= 15 and cols.max() >= 41 and rows.max() >= 41
    depth = plain["depth"][0].numpy()
    # all keypoints at z = 0: the relief is the capsules' (nearest 1.0, rims down to 0.2)
    on_hand = depth[mask] > 0
    assert depth.max() == 1.0 and depth[mask][on_hand].min() >= 0.2 and depth[2, 2] == 0.0
    assert np.array_equal(flipped["hand_mask"][0].numpy(), plain["hand_mask"][0].numpy()[:, ::-1])
    assert np.array_equal(flipped["depth"][0].numpy(), plain["depth"][0].numpy()[:, ::-1])
    assert list(refiner_example(synthetic_sample(None), False, random.Random(0), config)) == []


def test_hands_left_out_are_reported_with_the_reason():
    small = np.array([[10 + i * 0.1, 10, 2] for i in range(21)], float)
    few = np.zeros((21, 3))
    few[:5] = [[10 + i, 10, 2] for i in range(5)]
    hands, skipped = people_hand_depths(
        [Person([0, 0, 64, 64], None, small, few)], (64, 64), 4, min_hand_size=4.0
    )
    assert hands == []
    assert skipped == [
        {"side": "left", "reason": "too small (2.0 px < 4.0)"},
        {"side": "right", "reason": "5 labelled keypoints"},
    ]


def loader_for(module):
    config = {"data": {"params": {"refiner": {"resolution": 64, "min_padding": 4}}}}
    return lambda path, ckpt: (module, config)


def write_base(folder, key: str, image: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{key}.png")


def test_predictor_keeps_images_without_a_hand_and_repairs_the_others(refiner, tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "base"
    images = {k: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for k in ("a", "b")}
    for key, image in images.items():
        write_base(base, key, image)
    hand = np.array([[20 + (i % 5) * 4, 20 + (i // 5) * 4, 2] for i in range(21)], float)
    people = [
        [Person([0, 0, 64, 64], None, None, None)],
        [Person([0, 0, 64, 64], None, None, hand)],
    ]
    predictor = RefinerPredictor(
        "cfg", base_images=str(base), out_dir=str(tmp_path / "out"), check_hands=False,
        num_inference_steps=2, load_experiment=loader_for(refiner),
    )  # fmt: skip
    predictor.on_predict_start()
    batch = {"key": ["a", "b"], "people": people, "caption": ["p", "q"]}
    predictor.write_outputs(batch, predictor.sample_batch(batch))
    out = {k: np.asarray(Image.open(tmp_path / "out" / f"{k}.png")) for k in ("a", "b")}
    assert np.array_equal(out["a"], images["a"])
    assert not np.array_equal(out["b"], images["b"])
    records = [json.loads(line) for line in (tmp_path / "out" / "report-rank0.jsonl").open()]
    assert records[0] == {
        "key": "a",
        "depth": "pose",
        "strength": None,
        "refined": False,
        "hands": [],
    }
    assert records[1]["refined"] and records[1]["hands"] == [{"side": "right", "status": "refined"}]
    assert predictor.summary()["refined_fraction"] == 0.5


def test_predictor_names_a_missing_base_image(refiner, tmp_path):
    predictor = RefinerPredictor(
        "cfg", base_images=str(tmp_path / "none"), base_method="two_stage", check_hands=False,
        out_dir=str(tmp_path / "out"), load_experiment=loader_for(refiner),
    )  # fmt: skip
    batch = {"key": ["k"], "people": [[]], "caption": ["p"]}
    with pytest.raises(FileNotFoundError, match=r"none/k\.png is missing.*methods\.two_stage"):
        predictor.sample_batch(batch)


class StrengthTagged:
    """Stand-ins for the refiner and the hand detector: the refined image's value is the
    strength, and the detector finds the hand with an error looked up from it."""

    def __init__(self, errors: dict[float, float | None]):
        self.errors = errors
        self.tried: list[float] = []

    def refine(self, images, depths, masks, prompts, keys, strength):
        self.tried.append(strength)
        return torch.full((len(keys), 3, 8, 8), strength)

    def estimate(self, images):
        out = []
        for image in images:
            error = self.errors[round(float(image[0, 0, 0]), 2)]
            kp = (
                np.zeros((0, 21, 3))
                if error is None
                else np.stack([np.arange(21) * 3.0 + error, np.zeros(21), np.ones(21)], -1)[None]
            )
            out.append({"keypoints": torch.tensor(kp, dtype=torch.float32)})
        return out


@pytest.mark.parametrize(
    ("errors", "chosen", "tried"),
    [
        ({1.0: 10.0, 0.4: 11.0}, 0.4, [1.0, 0.4]),  # 11 < 1.15 x 10: the first later strength
        ({1.0: 10.0, 0.4: 20.0, 0.5: 11.4}, 0.5, [1.0, 0.4, 0.5]),
        (
            {1.0: 10.0, **{s: 30.0 for s in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}},
            1.0,
            [1.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        ),  # none good enough: back to 1.0
        ({1.0: None, 0.4: 50.0}, 0.4, [1.0, 0.4]),  # no hand at 1.0: any found hand is better
    ],
)
def test_adaptive_strength_keeps_the_first_strength_within_115_percent(errors, chosen, tried):
    stand_in = StrengthTagged(errors)
    predictor = RefinerPredictor.__new__(RefinerPredictor)
    predictor.refine, predictor.hand_detector = stand_in.refine, stand_in
    target = np.stack([np.arange(21) * 3.0, np.zeros(21), np.ones(21)], -1)[None]
    out, used = predictor.adaptive(
        torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), ["p"], ["k"],
        [target],
    )  # fmt: skip
    assert used == [chosen] and stand_in.tried == tried
    assert float(out[0, 0, 0, 0]) == pytest.approx(chosen)  # the chosen sample, not the last


def test_a_post_step_needs_its_base_method_before_it():
    refined = {"target": "x", "params": {"base_method": "two_stage"}}
    check_base_methods({"two_stage": {"target": "y"}, "refined": refined})
    with pytest.raises(ConfigError, match=r"methods\.refined\.params\.base_method='two_stage'"):
        check_base_methods({"refined": refined, "two_stage": {"target": "y"}})


def test_refine_a_folder_reports_photos_without_hands_and_repairs_a_real_hand(tmp_path):
    import shutil
    from pathlib import Path

    from experiments.refine import main

    photos = Path(__file__).parent / "data" / "real_photos"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos / "panoptic_ex2_2_000040_l.jpg", folder / "hand.jpg")
    blank = np.full((60, 90, 3), 128, np.uint8)  # not a multiple of 8, no hand
    Image.fromarray(blank).save(folder / "blank.png")
    out = tmp_path / "out"
    config = str(Path(__file__).parents[1] / "experiments/refiner/tiny.yaml")
    main([
        "--images", str(folder), "--prompt", "a hand", "--out", str(out), "--config", config,
        "--ckpt", "none", "--steps", "2",
    ])  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out / "blank.png")), blank)
    photo = np.asarray(Image.open(folder / "hand.jpg").convert("RGB"))
    refined = np.asarray(Image.open(out / "hand.png"))
    side = np.asarray(Image.open(out / "intermediate/hand_depth_mask.png"))
    mask = side[:, photo.shape[1] :, 0] > 127
    assert mask.any() and np.array_equal(refined[~mask], photo[~mask])
    reports = {
        r["key"]: r for r in map(json.loads, (out / "report-rank0.jsonl").read_text().splitlines())
    }
    assert reports["blank"]["refined"] is False
    assert reports["blank"]["hands"] == [
        {"status": "not detected", "reason": "no hand found in the image"}
    ]
    assert reports["hand"]["refined"] and reports["hand"]["hands"][0]["status"] == "refined"
    assert reports["hand"]["hands"][0]["side"] == "left"  # the labelled side of this hand


def test_refine_refuses_a_folder_without_images_and_unsafe_names(tmp_path, capsys):
    from experiments.refine import main

    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--prompt", "x"])
    assert "no .png/.jpg/.jpeg/.webp image" in capsys.readouterr().err
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--prompt", "x"])
    assert "a.jpg and a.png share a name" in capsys.readouterr().err


def test_the_known_region_is_kept_in_latent_space_too(refiner):
    """Without the pixel paste-back: after the last step the latents equal the source latent
    where the mask is 0 and were denoised where it is 1."""
    gen = torch.Generator().manual_seed(0)
    known = torch.randn(1, 4, 8, 8, generator=gen)
    paint = torch.zeros(1, 1, 8, 8)
    paint[..., 2:6, 3:7] = 1
    latents = refiner.sample_inpainting(
        torch.rand(1, 3, 64, 64), paint, known * (1 - paint), known, 1 - paint, ["x"],
        BlendConfig(mode="fixed"), generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    keep = (paint == 0).expand_as(known)
    assert torch.equal(latents[keep], known[keep])
    assert (latents[~keep] - known[~keep]).abs().min() > 0


class StandInDepth:
    """Hands a depth estimator might return: a normal one, a tiny one, one whose depth failed."""

    def __call__(self, image):
        size = (image.shape[1], image.shape[0])
        kp = np.zeros((21, 3))
        kp[:, 0], kp[:, 1] = np.linspace(10, 40, 21), np.linspace(10, 40, 21)
        good = hand_depth(kp, "right", size, 0.9, min_padding=4)
        tiny = kp.copy()
        tiny[:, :2] = 50 + tiny[:, :2] / 30
        small = hand_depth(tiny, "left", size, 0.8, min_padding=4)
        failed = hand_depth(kp, "left", size, 0.7, min_padding=4)
        failed.depth[:] = 0
        return [good, small, failed]


def test_detected_hands_too_small_or_without_depth_are_reported_not_refined(refiner, tmp_path):
    write_base(tmp_path / "base", "k", np.full((64, 64, 3), 100, np.uint8))
    predictor = RefinerPredictor(
        "cfg", base_images=str(tmp_path / "base"), depth="landmarks", check_hands=False,
        out_dir=str(tmp_path / "out"), num_inference_steps=2, load_experiment=loader_for(refiner),
    )  # fmt: skip
    predictor.estimator = StandInDepth()
    out = predictor.sample_batch({"key": ["k"], "people": [[]], "caption": ["p"]})
    statuses = [(h["side"], h["status"]) for h in out["reports"][0]]
    assert statuses == [("right", "refined"), ("left", "skipped"), ("left", "depth failed")]
    assert out["reports"][0][1]["reason"] == "too small (1.0 px < 4.0)"
    assert out["strengths"] == [0.55]


def test_sample_and_demo_run_a_post_step_after_its_base(tmp_path, synthetic_dir, monkeypatch):
    from pathlib import Path

    from experiments.sample import Pose, Sampler

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    sampler = Sampler(
        "experiments/eval/tiny.yaml", str(tmp_path),
        ["methods.controlnet_refined.params.ckpt=null", "methods.controlnet.params.ckpt=null",
         "methods.controlnet_refined.params.num_inference_steps=2",
         "methods.controlnet.params.num_inference_steps=2"],
    )  # fmt: skip
    assert not sampler.runnable("handrefiner") and sampler.runnable("two_stage_refined")
    hand = np.array([[40 + (i % 5) * 6, 40 + (i // 5) * 6, 2] for i in range(21)], float)
    pose = Pose([Person([20, 20, 90, 90], np.zeros((17, 3)), None, hand)], (128, 128))
    (out,) = sampler("controlnet_refined", pose, "a hand", key="k")
    base = np.asarray(Image.open(tmp_path / "controlnet" / "k.png"))
    refined = np.asarray(Image.open(out.image))
    assert base.shape == refined.shape and not np.array_equal(base, refined)
    with pytest.raises(ConfigError, match="use make refine"):
        sampler("handrefiner", pose, "a hand", key="k")
