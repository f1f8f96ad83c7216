"""The GPU benchmark scripts run end to end on tiny components (a lent GPU's minutes are not
spent finding a broken script)."""

from __future__ import annotations

import json
import sys

import pytest


def test_train_step_benchmark_runs_every_step_on_tiny_components(tmp_path, monkeypatch):
    from benchmarks import train_step

    out = tmp_path / "rows.json"
    argv = ["train_step", "--tiny", "--resolution", "64", "--batch-size", "2", "--steps", "1",
            "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    train_step.main()
    rows = {row["step"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {
        "hand generator", "hand generator, cached latents", "diffusers train_text_to_image.py",
        "ControlNet baseline", "ControlNet baseline, cached latents",
        "diffusers train_controlnet.py",
    }  # fmt: skip
    # the cached step skips the two VAE encodes: fewer FLOPs than the step from pixels
    for method in ("hand generator", "ControlNet baseline"):
        cached, pixels = rows[f"{method}, cached latents"], rows[method]
        assert 0 < cached["gflop_per_step"] < pixels["gflop_per_step"]
    assert all(row["images_per_second"] > 0 for row in rows.values())
    assert pytest.approx(2 / cached["seconds_per_step"], rel=0.01) == cached["images_per_second"]


def test_sampling_benchmark_runs_each_sampler_beside_its_pipeline(tmp_path, monkeypatch):
    from benchmarks import sampling

    out = tmp_path / "rows.json"
    argv = ["sampling", "--tiny", "--resolution", "64", "--batch-size", "2", "--steps", "2",
            "--repeats", "1", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    sampling.main()
    rows = json.loads(out.read_text())
    assert [row["sampler"] for row in rows] == [
        "handdiff plain SD", "diffusers StableDiffusionPipeline", "handdiff ControlNet baseline",
        "diffusers StableDiffusionControlNetPipeline",
    ]  # fmt: skip
    assert all(row["images_per_second"] > 0 and row["steps"] == 2 for row in rows)


def test_scoring_benchmark_times_every_part_of_the_evaluator(synthetic_dir, tmp_path, monkeypatch):
    from benchmarks import scoring

    out = tmp_path / "rows.json"
    argv = ["scoring", "--shards", f"{synthetic_dir}/val-*.tar", "--images", "4",
            "--batch-size", "2", "--resolution", "64", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    scoring.main()
    rows = json.loads(out.read_text())
    assert [row["part"] for row in rows] == [
        "FID/KID features", "CLIPSIM", "body pose estimator", "hand pose estimator",
    ]  # fmt: skip
    assert all(row["images"] == 4 and row["ms_per_image"] > 0 for row in rows)
