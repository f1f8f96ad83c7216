"""The evaluation module end to end: one process, two DDP processes, folder input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from datamodules.schema import decode_sample
from experiments.run import main
from metrics.evaluation import markdown_table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments/eval/metrics_tiny.yaml")


def _args(synthetic_dir, generated=None, *extra):
    return [
        CONFIG,
        f"data.params.generated={generated or str(synthetic_dir) + '/val-*.tar'}",
        f"data.params.real={synthetic_dir}/train-*.tar",
        "data.params.resolution=128",
        "data.params.batch_size=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def single(synthetic_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval1")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        main(["eval", *_args(synthetic_dir)])
    finally:
        os.chdir(cwd)
    return json.loads((workdir / "results/eval/metrics_tiny/results.json").read_text())


def test_every_metric_is_reported(single):
    results = single["results"]
    for key in (
        "fid",
        "kid_mean",
        "kid_std",
        "clipsim",
        "ap",
        "ap50",
        "ap75",
        "ap_m",
        "ap_l",
        "cap",
        "cap50",
        "cap75",
        "pce",
        "hand_ap",
        "pck@0.1",
        "pck@0.2",
        "detection_rate",
    ):
        assert key in results, key
    assert results["n_generated"] == 16 and results["n_real"] == 48
    assert set(results["per_category"]["fid"]) == {"scene0", "scene1"}
    assert results["kid_subset_size"] == 16
    assert results["fid"] > 0 and 0 <= results["clipsim"] <= 100
    assert 0 <= results["detection_rate"] <= 1 and results["pce"] >= 0
    assert results["pck@0.1"] <= results["pck@0.2"]
    assert single["settings"]["feature_extractor"] == "RandomConvFeatures"
    assert single["settings"]["antialias"] is True


def test_two_process_ddp_equals_one_process(single, synthetic_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "eval",
        *_args(synthetic_dir, None, "trainer.strategy=ddp", "trainer.devices=2"),
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "results/eval/metrics_tiny/results.json").read_text())
    assert ddp["settings"]["world_size"] == 2
    one, two = single["results"], ddp["results"]
    assert set(one) == set(two)
    for name in ("fid", "kid"):  # per category: every rank's images of a scene gathered
        by_scene = one["per_category"][name]
        assert two["per_category"][name] == pytest.approx(by_scene, rel=1e-5, abs=1e-9)
    for key in set(one) - {"per_category"}:
        if key.startswith(("ap", "cap", "hand_ap")) or key in ("pce", "n_real", "n_generated"):
            assert two[key] == one[key], key  # exactly
        else:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9, nan_ok=True), key


def test_folder_of_images_gives_the_same_results(single, synthetic_dir, tmp_path, monkeypatch):
    folder = tmp_path / "generated"
    folder.mkdir()
    raw = wds.DataPipeline(
        wds.SimpleShardList(sorted(str(p) for p in synthetic_dir.glob("val-*.tar"))),
        wds.tarfile_to_samples(),
    )
    for sample in map(decode_sample, raw):
        sample.image.save(folder / f"{sample.key}.png")  # lossless copy of the decoded pixels
    monkeypatch.chdir(tmp_path)
    # conditions are looked up by key in the real shards: point them at the val split
    main(
        [
            "eval",
            CONFIG,
            f"data.params.generated={folder}",
            f"data.params.real={synthetic_dir}/val-*.tar",
            "data.params.resolution=128",
            "data.params.batch_size=4",
        ]
    )
    from_folder = json.loads((tmp_path / "results/eval/metrics_tiny/results.json").read_text())
    for key in (
        "ap",
        "cap",
        "pce",
        "hand_ap",
        "pck@0.2",
        "detection_rate",
        "clipsim",
    ):
        assert from_folder["results"][key] == pytest.approx(
            single["results"][key], abs=1e-9, nan_ok=True
        )


def test_markdown_table_marks_directions_and_missing_values():
    table = markdown_table(
        {
            "a": {"fid": 12.345, "ap": 0.3185, "ap_m": -1.0},
            "b": {"fid": 10.0, "ap": 0.5, "ap_m": 0.25},
        }
    )
    lines = table.splitlines()
    assert lines[0] == "| method | fid ↓ | 100·ap ↑ | 100·ap_m ↑ |"
    assert lines[2] == "| a | 12.35 | 31.85 | – |"
    assert lines[3] == "| b | 10.00 | 50.00 | 25.00 |"
    assert lines[5].startswith("100·ap, 100·ap_m: the value times the factor")
