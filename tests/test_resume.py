"""A resumed run is a true continuation: the same batches as an uninterrupted run, the EMA of
every saved step, skipped-sample counts carried over, no duplicate TensorBoard steps, and no
checkpoint lost to a kill while saving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.checkpoints import AtomicCheckpointIO, find_last_checkpoint
from experiments.run import main
from tests.conftest import make_raw_sample, write_tar

ROOT = Path(__file__).resolve().parents[1]


class KeyRecorder(L.Callback):
    """Appends ``{"step", "keys"}`` of every training batch to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps({"step": trainer.global_step, "keys": batch["key"]}) + "\n")


def _fit(synthetic_dir, bad_shard, record: Path, *extra: str) -> None:
    main(
        [
            "fit",
            str(ROOT / "experiments/hand/tiny.yaml"),
            f"data.params.train_shards=[{synthetic_dir}/train-*.tar,{bad_shard}]",
            "data.params.val_shards=null",
            "data.params.batch_size=4",
            "data.params.epoch_size=24",  # 6 batches an epoch: the resume at 5 lands mid-epoch
            "callbacks.images=null",
            "callbacks.checkpoint.params.every_n_train_steps=5",
            "callbacks.recorder.target=tests.test_resume.KeyRecorder",
            f"callbacks.recorder.params.path={record}",
            *extra,
        ]
    )


def _steps(record: Path) -> dict[int, list[str]]:
    return {r["step"]: r["keys"] for r in map(json.loads, record.read_text().splitlines())}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_sees_what_an_uninterrupted_run_saw(
    synthetic_dir, tmp_path, monkeypatch, workers
):
    bad = make_raw_sample("bad", png=b"not an image")
    bad_shard = write_tar(tmp_path / "bad.tar", [bad, make_raw_sample("extra")])
    loader = f"data.params.num_workers={workers}"
    (tmp_path / "whole").mkdir()
    (tmp_path / "parts").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    _fit(synthetic_dir, bad_shard, tmp_path / "whole.jsonl", loader, "trainer.max_steps=10")
    monkeypatch.chdir(tmp_path / "parts")
    # resumed at batch 5: an odd position, so with 2 workers the other one serves first
    _fit(synthetic_dir, bad_shard, tmp_path / "parts.jsonl", loader, "trainer.max_steps=5")
    _fit(
        synthetic_dir, bad_shard, tmp_path / "parts.jsonl", loader, "trainer.max_steps=10",
        "ckpt_path=last",
    )  # fmt: skip
    whole, parts = _steps(tmp_path / "whole.jsonl"), _steps(tmp_path / "parts.jsonl")
    assert sorted(whole) == sorted(parts) == list(range(10))
    assert all(parts[s] == whole[s] for s in range(10)), [
        s for s in range(10) if parts[s] != whole[s]
    ]
    run = "logs/hand/tiny/version_0/checkpoints/last.ckpt"
    a = torch.load(tmp_path / "whole" / run, weights_only=True)
    b = torch.load(tmp_path / "parts" / run, weights_only=True)
    # the checkpoint holds the EMA of its own step; the resumed EMA equals the uninterrupted
    assert a["ema"]["optimization_step"] == a["global_step"] == 10
    assert b["ema"]["optimization_step"] == 10
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(x, y)
    # skipped-sample counts continue over the resume
    (monitor_a,) = [v for k, v in a["callbacks"].items() if "SkippedSampleMonitor" in k]
    (monitor_b,) = [v for k, v in b["callbacks"].items() if "SkippedSampleMonitor" in k]
    assert monitor_a["totals"].sum() > 0
    assert torch.equal(monitor_a["totals"], monitor_b["totals"])


def test_a_kill_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def killed(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # what a SIGTERM handler or Ctrl-C raises mid-save

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_training_writes_checkpoints_through_the_atomic_writer(synthetic_dir, tmp_path):
    from experiments.config import load_config
    from experiments.run import build

    cfg, provenance = load_config(
        [str(ROOT / "experiments/hand/tiny.yaml")],
        [f"data.params.train_shards={synthetic_dir}/train-*.tar", "data.params.val_shards=null"],
    )
    _, _, trainer, _ = build(cfg, provenance)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_resume_passes_over_a_damaged_checkpoint_without_duplicate_tensorboard_steps(
    synthetic_dir, tmp_path, monkeypatch, caplog
):
    """Killed while writing last.ckpt at step 10 (here: truncated to 0 bytes, step 10's own
    checkpoint gone): the resume starts from step 5, says so, and TensorBoard keeps one
    value per step, not the replayed steps 5-9 twice."""
    bad_shard = write_tar(tmp_path / "extra.tar", [make_raw_sample("extra")])
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "keys.jsonl"
    _fit(synthetic_dir, bad_shard, record, "trainer.max_steps=10", "trainer.log_every_n_steps=1")
    run = tmp_path / "logs/hand/tiny/version_0"
    (run / "checkpoints/last.ckpt").write_bytes(b"")
    (run / "checkpoints/step0000010.ckpt").unlink()
    found = find_last_checkpoint({"name": "hand/tiny"})
    assert found is not None and found.name == "step0000005.ckpt"
    assert "last.ckpt is damaged" in caplog.text
    _fit(
        synthetic_dir, bad_shard, record, "trainer.max_steps=10", "trainer.log_every_n_steps=1",
        "ckpt_path=last",
    )  # fmt: skip
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 9


@pytest.mark.parametrize(
    "command, config", [("predict", "two_stage/tiny.yaml"), ("eval", "eval/metrics_tiny.yaml")]
)
def test_predict_and_eval_refuse_a_top_level_ckpt_path(command, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(ROOT / "experiments" / config), "ckpt_path=some.ckpt"])
    assert exit_info.value.code == 2
    assert "is not used by" in capsys.readouterr().err


def test_the_newest_complete_checkpoint_wins_ties_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "logs/run/version_0/checkpoints"
    folder.mkdir(parents=True)
    for name in ("step0000005.ckpt", "step0000010.ckpt", "last.ckpt"):
        torch.save({"state_dict": {}}, folder / name)
        os.utime(folder / name, (1000, 1000))  # one second for all: a coarse clock
    assert find_last_checkpoint({"name": "run"}).name == "last.ckpt"
    (folder / "last.ckpt").write_bytes(b"")
    assert find_last_checkpoint({"name": "run"}).name == "step0000010.ckpt"
