"""End to end through the CLI: TensorBoard output, checkpoints, resume, EMA, export, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.run import main
from lightning_modules.hand_generator import HandGenerator

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments/hand/tiny.yaml")
LIMIT = str(ROOT / "experiments/debug/limit.yaml")


def _args(synthetic_dir, *extra) -> list[str]:
    return [
        TINY,
        LIMIT,
        f"data.params.train_shards={synthetic_dir}/train-*.tar",
        f"data.params.val_shards={synthetic_dir}/val-*.tar",
        "data.params.batch_size=4",
        "data.params.num_workers=0",
        "trainer.val_check_interval=10",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """One 20-step run of the tiny config (EMA on), shared by the tests below."""
    workdir = tmp_path_factory.mktemp("run")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        main(["fit", *_args(synthetic_dir)])
    finally:
        os.chdir(cwd)
    return workdir


def _run_dir(workdir: Path) -> Path:
    return workdir / "logs/hand/tiny/version_0"


def test_fit_writes_losses_images_hparams_and_checkpoints(trained):
    run = _run_dir(trained)
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/loss_denoise",
        "train/loss_mask",
        "val/loss",
        "data/skipped_total",
        "lr-AdamW",
    } <= scalars
    (tag,) = events.Tags()["images"]
    assert tag == "samples/skeleton|sample|mask|real"
    steps = [e.step for e in events.Images(tag)]
    assert steps == [10, 20]
    image = events.Images(tag)[-1]
    assert (image.width, image.height) == (2 + 4 * 66, 2 + 4 * 66)  # 4 columns x 4 rows of 64 px
    hparams = (run / "hparams.yaml").read_text()
    assert "model.params.mask_loss_weight" in hparams
    # TensorBoard's HPARAMS tab: the run's settings with its loss metrics
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer({"run": str(run)})
    mux.Reload()
    content = mux.PluginRunToTagToContent("hparams")["run"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert data.session_start_info.hparams["model.params.mask_loss_weight"].number_value == 1.0
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert tags == {"train/loss", "val/loss"}
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step0000010.ckpt", "step0000020.ckpt"]


def test_checkpoint_holds_trained_weights_and_ema_only(trained):
    ckpt = torch.load(_run_dir(trained) / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 20
    keys = ckpt["state_dict"].keys()
    assert all(k.startswith("unet.") for k in keys)
    assert ckpt["state_dict"]["unet.conv_in.weight"].shape[1] == 8
    assert len(ckpt["ema"]["shadow_params"]) == len(keys)


def test_ema_changes_and_survives_save_and_load(trained):
    ckpt = torch.load(_run_dir(trained) / "checkpoints/last.ckpt", weights_only=False)
    fresh = HandGenerator(components={"tiny": True}, ema={"enabled": True})
    initial = [p.detach().clone() for p in fresh.trainable_parameters()]
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    shadow = fresh.ema.shadow_params
    raw = fresh.trainable_parameters()
    assert all(torch.equal(s, t) for s, t in zip(shadow, ckpt["ema"]["shadow_params"], strict=True))
    # EMA moved away from the initial weights, but lags the raw weights
    assert any(not torch.equal(s, i) for s, i in zip(shadow, initial, strict=True))
    assert any(not torch.equal(s, r) for s, r in zip(shadow, raw, strict=True))
    with fresh.ema_weights():
        assert all(
            torch.equal(p, s) for p, s in zip(fresh.trainable_parameters(), shadow, strict=True)
        )
    assert all(torch.equal(p, r) for p, r in zip(fresh.trainable_parameters(), raw, strict=True))


def test_a_model_loaded_for_sampling_has_its_ema_baked_in(trained, monkeypatch):
    """load_module copies the EMA weights in once, so timed sampling calls do not swap the
    weights three times per call."""
    from experiments.run import load_module

    monkeypatch.chdir(trained)
    ckpt = torch.load(_run_dir(trained) / "checkpoints/last.ckpt", weights_only=False)
    model, _ = load_module(str(ROOT / "experiments/hand/tiny.yaml"), "last")
    assert model.ema is None
    for p, s in zip(model.trainable_parameters(), ckpt["ema"]["shadow_params"], strict=True):
        assert torch.equal(p, s)


def test_frozen_parts_are_rebuilt_identically():
    a = HandGenerator(components={"tiny": True})
    b = HandGenerator(components={"tiny": True})
    for name in ("vae", "text_encoder"):
        for (k, x), (_, y) in zip(
            getattr(a, name).state_dict().items(),
            getattr(b, name).state_dict().items(),
            strict=True,
        ):
            assert torch.equal(x, y), k


def test_resume_continues_the_step_count_and_the_run(trained, synthetic_dir, monkeypatch):
    monkeypatch.chdir(trained)
    main(["fit", *_args(synthetic_dir, "trainer.max_steps=30", "ckpt_path=last")])
    ckpt = torch.load(_run_dir(trained) / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 30
    assert not (trained / "logs/hand/tiny/version_1").exists()  # same TensorBoard run
    events = EventAccumulator(str(_run_dir(trained)), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert max(steps) == 29
    assert "trainer.max_steps: 30" in (_run_dir(trained) / "hparams.yaml").read_text()


def test_resume_at_max_steps_says_how_to_continue(trained, synthetic_dir, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    last = _run_dir(trained) / "checkpoints/last.ckpt"
    before = last.stat().st_mtime_ns
    assert main(["fit", *_args(synthetic_dir, "trainer.max_steps=10", "ckpt_path=last")]) == {}
    out = capsys.readouterr().out
    step = torch.load(last, weights_only=False)["global_step"]
    assert f"step {step}, which trainer.max_steps=10 already reaches" in out
    assert f"raise it, e.g. trainer.max_steps={2 * step}" in out
    assert f"ckpt_path=last: {last.relative_to(trained)} (step {step}" in out  # which it took
    assert last.stat().st_mtime_ns == before  # nothing trained, nothing written


def test_export_writes_a_loadable_diffusers_unet(trained, synthetic_dir, monkeypatch):
    monkeypatch.chdir(trained)
    ckpt_file = trained / "exported.ckpt"
    ckpt_file.write_bytes((_run_dir(trained) / "checkpoints/step0000020.ckpt").read_bytes())
    main(["export", *_args(synthetic_dir, f"ckpt_path={ckpt_file}", "export_dir=exported")])
    unet = UNet2DConditionModel.from_pretrained(trained / "exported/unet")
    assert (unet.config.in_channels, unet.config.out_channels) == (8, 5)
    ckpt = torch.load(ckpt_file, weights_only=False)
    # the exported weights are the EMA weights
    torch.testing.assert_close(unet.conv_in.weight, ckpt["ema"]["shadow_params"][0])
    assert not torch.equal(unet.conv_in.weight, ckpt["state_dict"]["unet.conv_in.weight"])
    assert (trained / "exported/handdiff.json").is_file()
    # and a model built on the exported UNet starts from them
    model = HandGenerator(components={"tiny": True, "unet": str(trained / "exported/unet")})
    torch.testing.assert_close(model.unet.conv_in.weight, unet.conv_in.weight)


def test_two_process_ddp_run_completes(synthetic_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "fit",
        *_args(
            synthetic_dir,
            "trainer.strategy=ddp",
            "trainer.devices=2",
            "trainer.max_steps=6",
            "callbacks.images.params.every_n_steps=3",
            "data.params.resampled=false",
        ),
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(
        tmp_path / "logs/hand/tiny/version_0/checkpoints/last.ckpt", weights_only=False
    )
    assert ckpt["global_step"] == 6


def test_resume_with_gradient_accumulation_restores_the_optimizer_step(
    synthetic_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    accumulate = ["trainer.accumulate_grad_batches=2", "callbacks.images=null"]
    main(["fit", *_args(synthetic_dir, "trainer.max_steps=4", *accumulate)])
    main(["fit", *_args(synthetic_dir, "trainer.max_steps=6", "ckpt_path=last", *accumulate)])
    ckpt = torch.load(
        tmp_path / "logs/hand/tiny/version_0/checkpoints/last.ckpt", weights_only=False
    )
    assert ckpt["global_step"] == 6
    # 6 optimiser steps of 2 micro-batches each
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 12


def test_skipped_samples_reach_tensorboard(tmp_path, monkeypatch):
    from tests.conftest import make_raw_sample, write_tar

    samples = []
    for i in range(12):
        samples.append(make_raw_sample(key=f"good{i}"))
        if i % 4 == 0:
            samples.append(make_raw_sample(key=f"bad{i}", png=b"truncated"))
    shard = write_tar(tmp_path / "mixed.tar", samples)
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            TINY,
            LIMIT,
            f"data.params.train_shards={shard}",
            "data.params.val_shards=null",
            "data.params.batch_size=2",
            "data.params.num_workers=0",
            "data.params.resampled=false",
            "data.params.shuffle_buffer=1",
            "trainer.max_steps=6",
            "callbacks.images=null",
            "callbacks.skipped_samples.params.log_every_n_steps=1",
        ]
    )
    events = EventAccumulator(
        str(tmp_path / "logs/hand/tiny/version_0"), size_guidance={"scalars": 0}
    )
    events.Reload()
    assert events.Scalars("data/skipped_total")[-1].value == 3
    assert events.Scalars("data/skipped_bad_image")[-1].value == 3


@pytest.mark.gpu
def test_bf16_compiled_fit_on_cuda(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = main(
        [
            "fit",
            *_args(
                synthetic_dir,
                "trainer.accelerator=gpu",
                "trainer.precision=bf16-mixed",
                "model.params.compile=true",
                "model.params.channels_last=true",
                "model.params.ema.enabled=true",
                "trainer.max_steps=10",
            ),
        ]
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = torch.load(
        tmp_path / "logs/hand/tiny/version_0/checkpoints/last.ckpt", weights_only=False
    )
    assert ckpt["global_step"] == 10
    # compiling in place keeps the plain parameter names in checkpoints
    assert "unet.conv_in.weight" in ckpt["state_dict"]
    assert ckpt["state_dict"]["unet.conv_in.weight"].dtype == torch.float32
    # the fast path: fused AdamW on CUDA (the default), the EMA checkpointed beside it
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is True and "ema" in ckpt


@pytest.mark.gpu
def test_bf16_compiled_fit_from_a_latent_cache_on_cuda(synthetic_dir, tmp_path, monkeypatch):
    """The fast path end to end: a cache written on the GPU, then a compiled channels-last
    bf16 run from it (the cache's tensors stay fp32; autocast takes them)."""
    from datamodules.hand_datamodule import HandDataModule
    from experiments.cache_latents import write_cache

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    dm = HandDataModule(f"{synthetic_dir}/train-*.tar", f"{synthetic_dir}/val-*.tar")
    write_cache(HandGenerator({"tiny": True}), dm, tmp_path / "cache", text=True, batch_size=16,
                per_shard=64)  # fmt: skip
    metrics = main([
        "fit", *_args(synthetic_dir, "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                      "model.params.compile=true", "model.params.channels_last=true",
                      f"data.params.latent_cache={tmp_path / 'cache'}", "trainer.max_steps=10"),
    ])  # fmt: skip
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
