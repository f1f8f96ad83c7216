"""Latent caches: the loss from a cache equals the loss from pixels for the same draws, every
orientation is cached, and stale caches are refused naming what differs."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from datamodules.hand_datamodule import HandDataModule
from datamodules.latent_cache import (
    StaleCacheError,
    cached_examples,
    cached_orientation,
)
from datamodules.shards import SkipCounter
from experiments.cache_latents import write_cache
from lightning_modules.hand_generator import HandGenerator
from lightning_modules.pose_conditioned import PoseConditionedDiffusion

ROOT = Path(__file__).resolve().parents[1]
CROP = {"resolution": 32, "flip_prob": 0.5}


def datamodule(shards, **kwargs) -> HandDataModule:
    return HandDataModule(
        f"{shards}/train-*.tar", f"{shards}/val-*.tar", crop=CROP, batch_size=4, **kwargs
    )


@pytest.fixture(scope="module")
def cached(synthetic_dir, tmp_path_factory):
    """A tiny hand generator and a cache of its training crops, text included."""
    torch.manual_seed(0)
    model = HandGenerator({"tiny": True})
    out = tmp_path_factory.mktemp("cache") / "hand"
    manifest = write_cache(
        model, datamodule(synthetic_dir), out, text=True, batch_size=5, per_shard=16
    )
    return model, out, manifest


def read_cache(folder: Path, orientation: int, n: int) -> dict:
    """The first ``n`` cache entries in ``orientation`` as one batch (as the loader collates)."""
    import webdataset as wds

    raw = wds.DataPipeline(wds.SimpleShardList(sorted(map(str, folder.glob("train-*.tar")))),
                           wds.tarfile_to_samples())  # fmt: skip
    examples = []
    for entry in cached_examples(raw, SkipCounter()):
        flip = 1.0 if orientation else 0.0
        examples += cached_orientation(entry, True, random.Random(0), flip)
        if len(examples) == n:
            break
    return default_collate(examples)


def test_the_loss_from_the_cache_equals_the_loss_from_pixels(cached, synthetic_dir):
    model, folder, manifest = cached
    model.caption_dropout = 0.5  # the dropped captions go through the encoder, the rest cached
    entries = list(datamodule(synthetic_dir).cache_entries())
    assert manifest["count"] == len(entries) and manifest["orientations"] == 2
    for orientation in (0, 1):
        pixels = default_collate([entry[orientation] for entry in entries[:6]])
        cache = read_cache(folder, orientation, 6)
        assert cache["caption"] == pixels["caption"] and cache["hand_key"] == pixels["hand_key"]
        assert "image" not in cache and cache["latent_mean"].shape == (6, 4, 4, 4)
        for seed in (0, 1):
            a = model.losses(pixels, train=True, generator=torch.Generator().manual_seed(seed))
            b = model.losses(cache, train=True, generator=torch.Generator().manual_seed(seed))
            for key in ("loss", "loss_denoise", "loss_mask"):
                assert float(b[key].detach()) == pytest.approx(
                    float(a[key].detach()), rel=1e-5, abs=1e-7
                ), key
    # the flipped orientation is another crop: mirrored image and the other side
    flipped, unflipped = read_cache(folder, 1, 6), read_cache(folder, 0, 6)
    assert (flipped["is_right"] != unflipped["is_right"]).all()
    assert not torch.allclose(flipped["latent_mean"], unflipped["latent_mean"])


@pytest.mark.parametrize("method", ["controlnet", "humansd"])
def test_full_body_methods_train_from_a_cache_with_the_same_loss(method, synthetic_dir, tmp_path):
    """The ControlNet baseline (the skeleton image cached as uint8) and HumanSD (the skeleton
    latent, body keypoints carried for its heatmap weights) from a full-body cache."""
    from datamodules.full_body_datamodule import FullBodyDataModule
    from lightning_modules.humansd import HumanSD

    torch.manual_seed(0)
    if method == "controlnet":
        model = PoseConditionedDiffusion(
            {"tiny": True}, conditioning="controlnet", train_unet=False
        )
    else:
        model = HumanSD({"tiny": True}, heatmap={"weight": 1.0, "heatmap_size": 16})
    dm = FullBodyDataModule(f"{synthetic_dir}/train-*.tar", f"{synthetic_dir}/val-*.tar",
                            body={"resolution": 64, "flip_prob": 0.5})  # fmt: skip
    manifest = write_cache(model, dm, tmp_path / "cache", text=False, batch_size=4, per_shard=64)
    stored = "pose_image" if method == "controlnet" else "pose_latent"
    assert stored in manifest["tensors"] and "body_keypoints" in manifest["tensors"]
    assert manifest["encoder"]["pose_condition"] == type(model.conditioning).__name__
    entries = list(dm.cache_entries())
    for orientation in (0, 1):
        pixels = default_collate([entry[orientation] for entry in entries[:4]])
        cache = read_cache(tmp_path / "cache", orientation, 4)
        assert torch.equal(cache["body_keypoints"], pixels["body_keypoints"])
        a = model.losses(pixels, train=True, generator=torch.Generator().manual_seed(0))
        b = model.losses(cache, train=True, generator=torch.Generator().manual_seed(0))
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-7)
        if method == "humansd":
            assert float(b["heatmap_weight"]) == float(a["heatmap_weight"]) > 0
    # a cache of one method is refused by the other kind of pose condition
    other = HandGenerator({"tiny": True})
    opened = FullBodyDataModule(f"{synthetic_dir}/train-*.tar", f"{synthetic_dir}/val-*.tar",
                                body={"resolution": 64, "flip_prob": 0.5},
                                latent_cache=str(tmp_path / "cache"))  # fmt: skip
    if method == "controlnet":
        with pytest.raises(StaleCacheError, match=r"encoder\.pose_condition"):
            opened.check_cache_encoder(other.cache_identity(text=False))


def test_a_cached_run_trains_through_the_cli(cached, synthetic_dir, tmp_path):
    from experiments.run import main

    _, folder, _ = cached
    metrics = main([
        "fit", str(ROOT / "experiments/hand/tiny_cached.yaml"),
        f"data.params.latent_cache={folder}",
        f"data.params.train_shards={synthetic_dir}/train-*.tar",
        f"data.params.val_shards={synthetic_dir}/val-*.tar", "data.params.crop.resolution=32",
        "data.params.num_workers=0", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1", f"logger.params.save_dir={tmp_path}",
        "callbacks.images.params.every_n_steps=3", "callbacks.checkpoint=null",
    ])  # fmt: skip
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/loss" in metrics
    # the same run with another VAE is refused before anything trains
    with pytest.raises(SystemExit) as exit_:
        main([
            "fit", str(ROOT / "experiments/hand/tiny_cached.yaml"),
            f"data.params.latent_cache={folder}",
            f"data.params.train_shards={synthetic_dir}/train-*.tar",
            f"data.params.val_shards={synthetic_dir}/val-*.tar", "data.params.crop.resolution=32",
            "model.params.components.tiny_seed=1", f"logger.params.save_dir={tmp_path}",
        ])  # fmt: skip
    assert exit_.value.code == 2


def test_stale_caches_are_refused_naming_what_differs(cached, synthetic_dir, tmp_path):
    _, folder, _ = cached
    with pytest.raises(StaleCacheError, match=r"examples\.crop"):
        HandDataModule(f"{synthetic_dir}/train-*.tar", f"{synthetic_dir}/val-*.tar",
                       crop={**CROP, "resolution": 64}, latent_cache=str(folder))  # fmt: skip
    # a source shard changed since the cache was written
    shards = tmp_path / "shards"
    shutil.copytree(synthetic_dir, shards)
    first = sorted(shards.glob("train-*.tar"))[0]
    first.write_bytes(first.read_bytes() + b"\0" * 512)
    with pytest.raises(StaleCacheError, match=r"sources\.shards"):
        datamodule(shards, latent_cache=str(folder))
    # another VAE
    dm = datamodule(synthetic_dir, latent_cache=str(folder))
    other = HandGenerator({"tiny": True, "tiny_seed": 1})
    with pytest.raises(StaleCacheError, match=r"encoder\.vae"):
        dm.check_cache_encoder(other.cache_identity(text=dm.cache_holds_text))
    dm.check_cache_encoder(cached[0].cache_identity(text=True))  # the cache's own model passes
    # flips on, but only unflipped crops cached; an unfinished cache
    single = tmp_path / "single"
    unflipped = HandDataModule(
        f"{synthetic_dir}/train-*.tar", f"{synthetic_dir}/val-*.tar", crop={**CROP, "flip_prob": 0}
    )
    write_cache(cached[0], unflipped, single, text=False, batch_size=8, per_shard=64)
    with pytest.raises(StaleCacheError, match="unflipped examples only"):
        datamodule(synthetic_dir, latent_cache=str(single))
    # a cache copied in part; cached text for a model that trains its text encoder
    shard = sorted(folder.glob("train-*.tar"))[-1]
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / shard.name).write_bytes(shard.read_bytes()[:1024])
    with pytest.raises(StaleCacheError, match=r"cache\.shards"):
        datamodule(synthetic_dir, latent_cache=str(partial))
    cached[0].text_encoder.get_input_embeddings().weight.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="trains part of the text encoder"):
            cached[0].cache_identity(text=True)
    finally:
        cached[0].text_encoder.get_input_embeddings().weight.requires_grad_(False)
    (single / "cache.json").unlink()
    with pytest.raises(StaleCacheError, match="unfinished"):
        datamodule(synthetic_dir, latent_cache=str(single))
