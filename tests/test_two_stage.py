"""The two-stage pipeline: hands planned, generated, pasted and outpainted; seeds; fallbacks;
and the tiny end-to-end run through the CLI (train both stages, then predict)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.full_body_datamodule import FullBodyConfig
from datamodules.hand_crops import HandCropConfig
from datamodules.schema import Person
from datamodules.synthetic import draw_person
from experiments.run import main
from lightning_modules.hand_generator import HandGenerator
from lightning_modules.outpainter import Outpainter
from lightning_modules.two_stage_pipeline import (
    TwoStagePipeline,
    plan_hands,
    resolve_mask_source,
    summarise_checks,
)

ROOT = Path(__file__).resolve().parents[1]


def _people(seed: int, size: int = 64) -> list[Person]:
    _, _, record = draw_person(np.random.default_rng(seed), size)
    p = record["people"][0]
    hands = {k: None if p[k] is None else np.array(p[k]) for k in ("left_hand", "right_hand")}
    return [Person(tuple(p["bbox"]), np.array(p["body"]), **hands)]


@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    return TwoStagePipeline(
        HandGenerator(components={"tiny": True}),
        Outpainter(components={"tiny": True}),
        HandCropConfig(resolution=32),
        FullBodyConfig(resolution=64),
        min_hand_size=4,
        num_inference_steps=2,
        guidance_scale=2.0,
    )


def test_outputs_and_intermediates(pipeline):
    people = [_people(1), _people(2)]
    out = pipeline(people, ["a person", "another person"], seeds=[5, 6])
    assert out["images"].shape == (2, 3, 64, 64)
    assert out["canvases"].shape == (2, 3, 64, 64) and out["known_masks"].shape == (2, 1, 64, 64)
    n = sum(len(r.hands_generated) for r in out["reports"])
    assert n > 0 and out["hand_images"].shape == (n, 3, 32, 32)
    assert out["hand_masks"].shape == (n, 1, 32, 32)
    assert out["canvases"][out["known_masks"].expand(-1, 3, -1, -1) == 0].abs().max() == 0
    assert all(r.hand_checks == [] for r in out["reports"])  # no detector given


def test_lambda_0_pastes_the_keypoint_hull_not_an_untrained_head():
    """With mask_loss_weight = 0 the mask head predicts sigma(0) = 0.5 everywhere, which the
    paste threshold (> 0.5) turns into nothing: the canvas would be empty. The pipeline takes
    the keypoint hull instead and refuses 'predicted'."""
    torch.manual_seed(0)
    no_mask_head = HandGenerator(components={"tiny": True}, mask_loss_weight=0.0)
    assert resolve_mask_source("auto", no_mask_head) == "keypoint_hull"
    with pytest.raises(ValueError, match="mask_loss_weight=0"):
        resolve_mask_source("predicted", no_mask_head)
    kw = dict(min_hand_size=4, num_inference_steps=2, guidance_scale=1.0)
    crop, body = HandCropConfig(resolution=32), FullBodyConfig(resolution=64)
    people = [_people(1)]
    hull = TwoStagePipeline(no_mask_head, Outpainter(components={"tiny": True}), crop, body, **kw)
    out = hull(people, ["a person"], seeds=[3])
    assert out["hand_masks"].min() == 0 and out["hand_masks"].max() == 1
    n_hands = len(out["reports"][0].hands_generated)
    assert n_hands > 0 and out["known_masks"].sum() > 4 * n_hands


class _ShiftedDetector:
    """Finds each planned hand at its conditioning keypoints shifted by (3, 4) px."""

    def __init__(self, plans):
        self.plans = plans

    def estimate(self, images):
        out = []
        for plan in self.plans:
            kp = torch.from_numpy(plan.crop_keypoints.copy())
            kp[:, :2] += torch.tensor([3.0, 4.0])
            out.append({"keypoints": kp[None], "scores": torch.ones(1), "handedness": ["Left"],
                        "sides": ["right"]})  # fmt: skip
        return out


def test_hand_check_measures_the_keypoint_error_of_each_generated_hand(pipeline):
    people = [_people(1)]
    plans, _ = plan_hands(people, pipeline.crop, pipeline.min_hand_size, [0])
    pipeline.hand_detector = _ShiftedDetector(plans)
    try:
        out = pipeline(people, ["a person"], seeds=[0])
    finally:
        pipeline.hand_detector = None
    checks = out["reports"][0].hand_checks
    assert [c["side"] for c in checks] == out["reports"][0].hands_generated
    for check, plan in zip(checks, plans, strict=True):
        labelled = plan.crop_keypoints[plan.crop_keypoints[:, 2] > 0, :2]
        size = (labelled.max(0) - labelled.min(0)).max()
        assert check["detected"] and check["error_px"] == pytest.approx(5.0)
        assert check["error_rel"] == pytest.approx(5.0 / size)
        assert check["detected_side"] == "right"  # MediaPipe's "Left" on an unmirrored image
    summary = summarise_checks([*checks, {**checks[0], "detected": False}])
    assert summary["stage1_detection_rate"] == pytest.approx(len(checks) / (len(checks) + 1))
    assert summary["stage1_error_px"] == pytest.approx(5.0)
    right = sum(c["side"] == "right" for c in checks)
    assert summary["stage1_side_agreement"] == pytest.approx(right / len(checks))


def test_seeded_per_image_independent_of_the_batch(pipeline):
    a, b = _people(1), _people(2)
    both = pipeline([a, b], ["x", "y"], seeds=[5, 6])
    alone = pipeline([b], ["y"], seeds=[6])
    # equal up to the summation order of batched kernels
    torch.testing.assert_close(both["images"][1], alone["images"][0], rtol=0, atol=1e-5)
    other = pipeline([b], ["y"], seeds=[7])
    assert not torch.allclose(other["images"][0], alone["images"][0])


def test_small_hands_fall_back_and_are_reported(pipeline):
    pipeline.min_hand_size = 1000
    try:
        out = pipeline([_people(1)], ["a person"], seeds=[0])
    finally:
        pipeline.min_hand_size = 4
    (report,) = out["reports"]
    assert report.hands_generated == [] and report.hands_skipped
    reasons = [s["reason"] for s in report.hands_skipped]
    assert any("too small" in r for r in reasons), reasons
    assert all("too small" in r or "labelled keypoints" in r for r in reasons)
    assert out["known_masks"].sum() == 0 and out["images"].shape == (1, 3, 64, 64)


def test_tiny_end_to_end_through_the_cli(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = [
        f"data.params.train_shards={synthetic_dir}/train-*.tar",
        f"data.params.val_shards={synthetic_dir}/val-*.tar",
        "data.params.num_workers=0",
        "trainer.max_steps=3",
        "callbacks.images=null",
        "trainer.limit_val_batches=1",
    ]
    hand_cfg, outpaint_cfg = (
        str(ROOT / f"experiments/{m}/tiny.yaml") for m in ("hand", "outpaint")
    )
    main(["fit", hand_cfg, *data])
    main(["fit", outpaint_cfg, *data])
    main(
        [
            "predict",
            str(ROOT / "experiments/two_stage/tiny.yaml"),
            f"model.params.hand_config={hand_cfg}",
            f"model.params.outpaint_config={outpaint_cfg}",
            "model.params.num_inference_steps=2",
            f"data.params.shards={synthetic_dir}/val-*.tar",
        ]
    )
    out = tmp_path / "results/two_stage/tiny"
    images = sorted(out.glob("*.png"))
    assert len(images) == 16
    from PIL import Image

    assert Image.open(images[0]).size == (128, 128)
    reports = [json.loads(line) for line in (out / "report-rank0.jsonl").read_text().splitlines()]
    assert len(reports) == 16 and sum(len(r["hands_generated"]) for r in reports) > 0
    # MediaPipe checked every generated hand (a 3-step tiny model draws no detectable hand)
    assert all(len(r["hand_checks"]) == len(r["hands_generated"]) for r in reports)
    assert {r["hand_mask"] for r in reports} == {"predicted"}
    canvas = np.asarray(Image.open(out / "intermediate" / f"{reports[0]['key']}_canvas.png"))
    assert np.median(canvas) in (127, 128)  # grey where no hand is, as the outpainter sees it

    # the same under 2-process DDP: every pose once, one report file per rank, same images
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "predict",
        str(ROOT / "experiments/two_stage/tiny.yaml"),
        f"model.params.hand_config={hand_cfg}",
        f"model.params.outpaint_config={outpaint_cfg}",
        "model.params.num_inference_steps=2",
        f"data.params.shards={synthetic_dir}/val-*.tar",
        "model.params.out_dir=ddp_out",
        "trainer.strategy=ddp",
        "trainer.devices=2",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = tmp_path / "ddp_out"
    keys = [
        json.loads(line)["key"]
        for r in (0, 1)
        for line in (ddp / f"report-rank{r}.jsonl").read_text().splitlines()
    ]
    assert sorted(keys) == sorted(r["key"] for r in reports)  # each exactly once
    single = np.asarray(Image.open(out / f"{keys[0]}.png"), dtype=float)
    split = np.asarray(Image.open(ddp / f"{keys[0]}.png"), dtype=float)
    assert np.abs(single - split).max() <= 1  # per-image seeds: same image (8-bit rounding)


@pytest.mark.gpu
def test_outpainter_bf16_fit_and_pipeline_on_cuda(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            str(ROOT / "experiments/outpaint/tiny.yaml"),
            f"data.params.train_shards={synthetic_dir}/train-*.tar",
            f"data.params.val_shards={synthetic_dir}/val-*.tar",
            "data.params.num_workers=0",
            "trainer.max_steps=5",
            "trainer.accelerator=gpu",
            "trainer.precision=bf16-mixed",
            "callbacks.images.params.every_n_steps=5",
            "trainer.limit_val_batches=1",
        ]
    )
    pipe = TwoStagePipeline(
        HandGenerator(components={"tiny": True}).cuda(),
        Outpainter(components={"tiny": True}).cuda(),
        HandCropConfig(resolution=32),
        FullBodyConfig(resolution=64),
        min_hand_size=4,
        num_inference_steps=3,
        guidance_scale=2.0,
    )
    out = pipe([_people(1)], ["a person"], seeds=[1])
    assert out["images"].shape == (1, 3, 64, 64) and torch.isfinite(out["images"]).all()
