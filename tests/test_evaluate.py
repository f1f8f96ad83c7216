"""The evaluation harness (`make eval`): every method end to end on tiny models, resuming,
two-process DDP against one process, subset selection and config errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.evaluation_datamodule import select_subset
from datamodules.shards import expand_shards
from experiments.config import ConfigError
from experiments.config import load_config as load_any_config
from experiments.evaluate import evaluate, load_config, required_training

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    *("two_stage", "hand_generator", "humansd", "controlnet", "plain_sd"),
    *("sd_hand_lora", "sd_hand_ti", "sd_negative_embedding"),
    *("plain_sd_refined", "controlnet_refined", "two_stage_refined", "handrefiner"),
)
WHOLE = [m for m in METHODS if m != "hand_generator"]
CONFIG_KEYS = {"two_stage": ("hand_config", "outpaint_config")}


def _write_config(workdir: Path, synthetic_dir: Path) -> Path:
    """experiments/eval/tiny.yaml on the test's synthetic shards, 8 poses, 2 sampling steps,
    methods trained on the fly for 3 steps."""
    methods = yaml.safe_load((ROOT / "experiments/eval/tiny.yaml").read_text())["methods"]
    for name, node in methods.items():
        node["params"]["num_inference_steps"] = 2
        for key in CONFIG_KEYS.get(name, ("config",)):
            node["params"][key] = str(ROOT / node["params"][key])
    config = {
        "defaults": [str(ROOT / "experiments/eval/base/tiny.yaml")],
        "name": "eval/test",
        "eval_set": {"shards": f"{synthetic_dir}/val-*.tar", "subset": 8, "batch_size": 4},
        "train_overrides": [
            f"data.params.train_shards={synthetic_dir}/train-*.tar",
            "data.params.val_shards=null",
            "data.params.num_workers=0",
            "trainer.max_steps=3",
            "callbacks.images=null",
        ],
        "methods": methods,
    }
    path = workdir / "eval_test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def evaluated(synthetic_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("harness")
    config = _write_config(workdir, synthetic_dir)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        rows = evaluate(load_config([str(config)]))
    finally:
        os.chdir(cwd)
    return workdir, config, rows


def test_every_method_is_generated_scored_and_tabulated(evaluated):
    workdir, _, rows = evaluated
    out = workdir / "results/eval/test"
    assert list(rows) == list(METHODS)
    for method in METHODS:
        row = rows[method]
        assert row["seconds_per_image"] > 0 and row["images_timed"] > 0
        assert row["seconds_per_image_batch1"] > 0  # HumanSD's protocol, 2 runs here
        timing = json.loads((out / method / "images/timing-batch1-rank0.json").read_text())
        assert len(timing["seconds"]) == 2
        assert row["fid"] >= 0 and 0 <= row["clipsim"] <= 100 and 0 <= row["detection_rate"] <= 1
        if method == "hand_generator":
            assert "ap" not in row  # hand crops: no body metrics
            crops = list((out / method / "images").glob("*_hand*.png"))
            assert row["n_generated"] == row["n_real"] == len(crops) > 8
        else:
            assert "ap" in row and "cap" in row and "pce" in row
            assert row["n_generated"] == row["n_real"] == 8
            assert len(list((out / method / "images").glob("*.png"))) == 8
    # the same 8 poses for every method: the saved subset
    keys = json.loads((out / "subset.json").read_text())["keys"]
    assert len(keys) == 8
    assert {p.stem for p in (out / "humansd/images").glob("*.png")} == set(keys)
    # tables: JSON with everything, Markdown with directions, CSV with raw values
    record = json.loads((out / "results.json").read_text())
    assert record["subset_size"] == 8 and record["world_size"] == 1
    assert _scalars(record["methods"]["humansd"]) == pytest.approx(
        _scalars(rows["humansd"]), nan_ok=True
    )
    assert set(rows["humansd"]["per_category"]["fid"]) == {"scene0", "scene1"}
    assert rows["two_stage"]["stage1_hands"] > 0 and "stage1_detection_rate" in rows["two_stage"]
    assert record["method_settings"]["two_stage"] == {"hand_mask": "predicted"}
    table = (out / "results.md").read_text()
    assert "| fid ↓ |" in table and "100·ap ↑" in table and "seconds_per_image ↓" in table
    lines = table.splitlines()
    assert [line.split(" | ")[0] for line in lines[4 : 4 + len(METHODS)]] == [
        f"| {m}" for m in METHODS
    ]
    assert "- two_stage: hand_mask=predicted" in lines
    with (out / "results.csv").open() as file:
        csv_rows = list(csv.DictReader(file))
    assert [r["method"] for r in csv_rows] == list(METHODS)
    assert float(csv_rows[2]["fid"]) == pytest.approx(rows["humansd"]["fid"])
    # grid: 4 poses x (skeleton, real, 11 whole-image methods) at 128 px with 2 px padding,
    # under a 16 px strip naming the columns
    grid = np.asarray(Image.open(out / "comparison.png"))
    assert grid.shape[:2] == (16 + 4 * 130 + 2, 13 * 130 + 2)
    assert (grid[:16, 2:128] < 128).any()  # text in the first column's label
    # the checkpoints each method loaded, with their digests (two_stage loads two)
    assert set(record["checkpoints"]["two_stage"]) == {"hand_ckpt", "outpaint_ckpt"}
    assert all(len(c["digest"]) == 64 for c in record["checkpoints"]["two_stage"].values())


def test_forgetting_check_scores_the_hand_fixes_against_the_base_model_on_other_prompts(
    evaluated, tmp_path_factory
):
    workdir, config, _ = evaluated
    forgetting = yaml.safe_load((ROOT / "experiments/eval/forgetting_tiny.yaml").read_text())
    test = yaml.safe_load(config.read_text())
    methods = forgetting["methods"]
    for node in methods.values():
        node["params"]["num_inference_steps"] = 2
        node["params"]["config"] = str(ROOT / node["params"]["config"])
    path = workdir / "forgetting_test.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": [str(ROOT / "experiments/eval/base/tiny.yaml")],
        "name": "eval/forgetting_test",
        "eval_set": {**test["eval_set"], "real_method": "plain_sd", "timing_runs": 0,
                     "prompts": str(ROOT / "experiments/eval/prompts/no_hands.txt")},
        "train_overrides": test["train_overrides"],
        "methods": methods,
        "metrics": forgetting["metrics"],
    }, sort_keys=False))  # fmt: skip
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        rows = evaluate(load_config([str(path)]))
    finally:
        os.chdir(cwd)
    assert list(rows) == ["plain_sd", "sd_hand_lora", "sd_negative_embedding"]
    assert rows["plain_sd"]["fid"] == pytest.approx(0, abs=1e-6)  # the reference itself
    out = workdir / "results/eval/forgetting_test"
    base = {p.name: np.asarray(Image.open(p)) for p in (out / "plain_sd/images").glob("*.png")}
    for method in ("sd_hand_lora", "sd_negative_embedding"):
        assert rows[method]["fid"] > rows["plain_sd"]["fid"] and "clipsim" in rows[method]
        assert "ap" not in rows[method]  # no people asked for, no pose metrics
        changed = [
            not np.array_equal(np.asarray(Image.open(out / method / "images" / name)), image)
            for name, image in base.items()
        ]
        assert len(changed) == 8 and all(changed)
    record = json.loads((out / "plain_sd/images/generation.json").read_text())
    assert len(record["method"]["prompt_set"]) == 64
    # the same key and seed with another prompt: another image than in the hand evaluation
    key = sorted((out / "plain_sd/images").glob("*.png"))[0].name
    hands = np.asarray(Image.open(workdir / "results/eval/test/plain_sd/images" / key))
    assert not np.array_equal(np.asarray(Image.open(out / "plain_sd/images" / key)), hands)


def test_handrefiner_rows_repair_their_base_methods_images_and_nothing_else(evaluated):
    workdir, _, rows = evaluated
    out = workdir / "results/eval/test"
    record = json.loads((out / "results.json").read_text())
    assert record["method_settings"]["two_stage_refined"] == {
        "depth": "pose", "strength": "0.55", "base": "two_stage",
    }  # fmt: skip
    for method, base in (("two_stage_refined", "two_stage"), ("controlnet_refined", "controlnet")):
        assert rows[method]["refined_fraction"] > 0.5
        generation = json.loads((out / method / "images/generation.json").read_text())
        assert generation["method"]["base_generation"]["method"]["target"].endswith(
            "TwoStagePredictor" if base == "two_stage" else "MethodPredictor"
        )
        assert generation["method"]["base_generation"]["checkpoints"]
        reports = [json.loads(line) for line in (out / method / "images/report-rank0.jsonl").open()]
        refined = 0
        for report in reports:
            key = report["key"]
            before = np.asarray(Image.open(out / base / "images" / f"{key}.png"))
            after = np.asarray(Image.open(out / method / "images" / f"{key}.png"))
            side = np.asarray(
                Image.open(out / method / f"images/intermediate/{key}_depth_mask.png")
            )
            mask = side[:, before.shape[1] :, 0] > 127
            assert np.array_equal(after[~mask], before[~mask])  # bit for bit outside the mask
            if report["refined"]:
                refined += 1
                assert (after[mask] != before[mask]).any()
                assert all(h["status"] in ("refined", "skipped") for h in report["hands"])
                assert report["check"]["hands"] >= 1
            else:
                assert np.array_equal(after, before)
        assert refined == round(rows[method]["refined_fraction"] * len(reports))
    # the refiner on its own repaints the real photos' hands
    assert rows["handrefiner"]["refined_fraction"] > 0.5
    assert "refiner_detected_before" in rows["handrefiner"]


def test_tensorboard_has_a_run_per_method_with_scalars_and_hparams(evaluated):
    workdir, _, rows = evaluated
    for method in METHODS:
        run = EventAccumulator(str(workdir / "logs/eval/test" / method)).Reload()
        scalars = run.Tags()["scalars"]
        assert "eval/fid" in scalars and "hparams/seconds_per_image" in scalars
        fid = run.Scalars("eval/fid")[-1].value
        assert fid == pytest.approx(rows[method]["fid"], rel=1e-5)
        assert "_hparams_/session_start_info" in run.summary_metadata
    grid = EventAccumulator(str(workdir / "logs/eval/test/comparison")).Reload()
    assert grid.Tags()["images"] == ["comparison/" + " | ".join(["skeleton", "real", *WHOLE])]


def test_a_rerun_resumes_and_regenerates_only_what_is_missing(evaluated, monkeypatch):
    workdir, config, rows = evaluated
    monkeypatch.chdir(workdir)
    images = workdir / "results/eval/test/controlnet/images"
    lost = sorted(images.glob("*.png"))[0]
    before = np.asarray(Image.open(lost), dtype=float)
    lost.unlink()
    timing = images / "timing-rank0.jsonl"
    lines = len(timing.read_text().splitlines())
    again = evaluate(load_config([str(config)]))
    # the same seed, the same image (up to 8-bit rounding: it is now batched alone)
    assert np.abs(np.asarray(Image.open(lost), dtype=float) - before).max() <= 1
    assert len(timing.read_text().splitlines()) == lines + 1  # one batch: the missing pose
    humansd_timing = workdir / "results/eval/test/humansd/images/timing-rank0.jsonl"
    assert len(humansd_timing.read_text().splitlines()) == 2  # untouched: 8 poses, 2 batches
    for method in METHODS:
        for key, value in _scalars(rows[method]).items():
            if key.startswith(("fid", "kid")):
                assert again[method][key] == pytest.approx(value, rel=1e-3, nan_ok=True), (
                    method,
                    key,
                )
            elif not key.startswith(("seconds_per_image", "images_timed")):
                assert again[method][key] == pytest.approx(value, abs=1e-9, nan_ok=True), (
                    method,
                    key,
                )
    # another subset under the same name is refused instead of mixing images
    with pytest.raises(ConfigError, match=r"subset\.json"):
        evaluate(load_config([str(config)], ["eval_set.subset=4"]))


def _scalars(row: dict) -> dict:
    """A results row without its nested per-category scores."""
    return {k: v for k, v in row.items() if k != "per_category"}


# HandRefiner on the real photos writes images that are the photos outside the hands: people
# are found in them, and a pose detection can flip on the 1/255 differences that another
# thread count (one per DDP process) leaves in the refined pixels
NEAR_REAL = {"handrefiner"}
POSE_KEYS = ("ap", "ap_m", "cap", "pce", "pck@0.1", "pck@0.2", "hand_", "detection_rate",
             "refiner_detected", "refiner_error", "n_hand")  # fmt: skip


def _cells(table: str) -> list[list[str]]:
    """The Markdown table without its timing columns (wall time differs between runs) and,
    for the near-real rows, without the pose columns."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    timing = {n for n, c in enumerate(rows[0]) if c.startswith("seconds_per_image")}
    pose = {n for n, c in enumerate(rows[0]) if c.split("·")[-1].startswith(POSE_KEYS)}
    return [
        [c for n, c in enumerate(r) if n not in timing and (r[0] not in NEAR_REAL or n not in pose)]
        for r in rows
    ]


def _compared(method: str, key: str) -> bool:
    return method not in NEAR_REAL or not key.startswith(POSE_KEYS)


def test_two_process_ddp_writes_the_same_table(evaluated):
    workdir, config, rows = evaluated
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "experiments.evaluate", str(config), "name=eval/test_ddp",
           "trainer.strategy=ddp", "trainer.devices=2"]  # fmt: skip
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one = (workdir / "results/eval/test/results.md").read_text()
    two = (workdir / "results/eval/test_ddp/results.md").read_text()
    assert _cells(two) == _cells(one)
    ddp = json.loads((workdir / "results/eval/test_ddp/results.json").read_text())
    assert ddp["world_size"] == 2
    for method in METHODS:
        # each rank timed its own batches; all 8 poses (or every crop) were generated once
        images = workdir / "results/eval/test_ddp" / method / "images"
        assert {p.name for p in images.glob("timing-rank*.jsonl")} == {
            "timing-rank0.jsonl",
            "timing-rank1.jsonl",
        }
        for scores in ("fid", "kid"):
            assert ddp["methods"][method]["per_category"][scores] == pytest.approx(
                rows[method]["per_category"][scores], rel=1e-4
            )
        for key, value in _scalars(rows[method]).items():
            if not _compared(method, key):
                continue
            if key.startswith(("fid", "kid")):
                assert ddp["methods"][method][key] == pytest.approx(value, rel=1e-4, nan_ok=True), (
                    key
                )
            elif not key.startswith(("seconds_per_image", "images_timed")):
                assert ddp["methods"][method][key] == pytest.approx(value, abs=1e-9, nan_ok=True), (
                    key
                )


def test_a_prompt_set_replaces_captions_for_generation_and_scoring(synthetic_dir, tmp_path):
    from datamodules.evaluation_datamodule import EvaluationDataModule
    from datamodules.pose_datamodule import PoseDataModule

    shards = f"{synthetic_dir}/val-*.tar"
    keys = select_subset(expand_shards(shards), 3, seed=0)
    captions = {keys[0]: "a red car", keys[1]: "a bowl of fruit"}
    poses = PoseDataModule(shards, 64, 8, keys=keys, captions=captions)
    (batch,) = list(poses.predict_dataloader())
    by_key = dict(zip(batch["key"], batch["caption"], strict=True))
    assert by_key[keys[0]] == "a red car" and by_key[keys[1]] == "a bowl of fruit"
    assert by_key[keys[2]] not in captions.values()  # not in the set: its own caption
    # a folder of another method's images as the reference, captions replaced on both sides
    folder = tmp_path / "reference"
    folder.mkdir()
    for key in keys:
        Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(folder / f"{key}.png")
    data = EvaluationDataModule(
        str(folder), str(folder), 64, 8, keys=keys, conditions=shards, captions=captions
    )
    generated, real = (next(iter(loader)) for loader in data.test_dataloader())
    for batch in (generated, real):
        assert dict(zip(batch["key"], batch["caption"], strict=True))[keys[0]] == "a red car"
        assert float(batch["image"].mean()) == pytest.approx(7 / 255)


def test_subset_is_fixed_by_seed_and_independent_of_shard_order(synthetic_dir):
    urls = expand_shards(f"{synthetic_dir}/val-*.tar")
    five = select_subset(urls, 5, seed=0)
    assert len(five) == 5 and five == select_subset(urls[::-1], 5, seed=0)
    assert select_subset(urls, 8, seed=0)[:5] == five  # a larger subset contains it
    assert select_subset(urls, 5, seed=1) != five
    assert sorted(select_subset(urls, None)) == sorted(select_subset(urls, 100))


def test_methods_needing_training_and_config_errors(tmp_path):
    cfg = load_config([str(ROOT / "experiments/eval/tiny.yaml")])
    needs = {m: required_training(node) for m, node in cfg["methods"].items()}
    assert needs["two_stage"] == ["experiments/hand/tiny.yaml", "experiments/outpaint/tiny.yaml"]
    assert needs["humansd"] == ["experiments/humansd/tiny.yaml"] and needs["plain_sd"] == []
    tiny = [str(ROOT / "experiments/eval/tiny.yaml")]
    with pytest.raises(ConfigError, match=r"methods\.humansd\.params\.out_dir.*set by the harness"):
        load_config(tiny, ["methods.humansd.params.out_dir=x"])
    with pytest.raises(ConfigError, match=r"eval_set\.subsets.*did you mean 'subset'"):
        load_config(tiny, ["eval_set.subsets=3"])
    with pytest.raises(ConfigError, match=r"methods\.humansd\.params\.steps"):
        load_config(tiny, ["methods.humansd.params.steps=3"])


@pytest.mark.parametrize(
    "variant, key, value",
    [
        ("hand_lambda0", "model.params.mask_loss_weight", 0.0),
        ("hand_lambda5", "model.params.mask_loss_weight", 5.0),
        ("hand_controlnet", "model.params.conditioning", "controlnet"),
        ("humansd_lambda0", "model.params.heatmap.weight", 0.0),
        ("humansd_lambda1", "model.params.heatmap.weight", 1.0),
        ("humansd_network", "model.params.heatmap.source", "network"),
        ("controlnet_perceptual", "model.params.perceptual.lpips_weight", 0.2),
        ("controlnet_perceptual_l0p1_l0p7", "model.params.perceptual.face_weight", 0.7),
        ("controlnet_perceptual_t400", "model.params.perceptual.max_timestep", 400),
        (
            "controlnet_perceptual_per_batch",
            "model.params.perceptual.timestep_sampling",
            "per_batch",
        ),
        ("hand_perceptual", "model.params.perceptual.region", "hand"),
    ],
)
def test_ablation_variants_change_one_thing(variant, key, value):
    import yaml
    from omegaconf import OmegaConf

    path = ROOT / f"experiments/ablations/variants/{variant}.yaml"
    cfg, _ = load_any_config([path])
    # compared with the config it derives from (its first default)
    parent = (path.parent / yaml.safe_load(path.read_text())["defaults"][0]).resolve()
    reference, _ = load_any_config([parent])
    assert OmegaConf.select(cfg, key) == value != OmegaConf.select(reference, key)
    assert cfg.name == f"ablations/{variant}"  # its own run, its own checkpoints


def test_every_ablation_config_is_valid():
    configs = sorted((ROOT / "experiments/ablations").glob("*.yaml"))
    assert len(configs) == 6
    for path in configs:
        cfg = load_config([str(path)])
        assert len(cfg["methods"]) >= 3 and cfg["name"] == f"ablations/{path.stem}"


def test_images_made_with_other_settings_or_checkpoints_are_not_reused(tmp_path):
    from experiments.evaluate import check_generation

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights v1")
    node = {
        "target": "lightning_modules.method_predictor.MethodPredictor",
        "params": {"config": "experiments/plain_sd/tiny.yaml", "ckpt": str(ckpt),
                   "num_inference_steps": 10},
    }  # fmt: skip
    images = tmp_path / "images"
    check_generation("m", node, images, [], regenerate=False)
    (images / "k.png").write_bytes(b"an image made with 10 steps")
    check_generation("m", node, images, [], regenerate=False)  # unchanged: reused
    fewer = {**node, "params": {**node["params"], "num_inference_steps": 1}}
    with pytest.raises(ConfigError, match=r"method\.params\.num_inference_steps"):
        check_generation("m", fewer, images, [], regenerate=False)
    ckpt.write_bytes(b"weights v2")
    with pytest.raises(ConfigError, match=r"checkpoints\.ckpt\.digest"):
        check_generation("m", node, images, [], regenerate=False)
    check_generation("m", node, images, [], regenerate=True)
    assert not (images / "k.png").exists()  # made again with the new checkpoint
    check_generation("m", node, images, [], regenerate=False)
