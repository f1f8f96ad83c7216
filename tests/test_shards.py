"""Shard lists, unreadable shards, and how ranks/workers split the data."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.hand_datamodule import HandDataModule
from datamodules.shards import ShardError, check_shards, expand_shards
from tests.conftest import make_raw_sample, write_tar


def test_brace_and_glob_patterns(synthetic_dir):
    brace = expand_shards(str(synthetic_dir / "train-{000000..000003}.tar"))
    glob = expand_shards([str(synthetic_dir / "train-*.tar")])
    assert brace == glob and len(brace) == 4


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nope-*.tar")
    with pytest.raises(ShardError, match="nope-"):
        expand_shards(pattern)


def test_unreadable_shard_is_named(tmp_path):
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"definitely not a tar archive" * 10)
    with pytest.raises(ShardError, match=r"broken\.tar"):
        check_shards([str(bad)])
    with pytest.raises(ShardError, match=r"broken\.tar"):
        HandDataModule(str(bad))


def _keys(dm: HandDataModule, num_workers: int) -> list[str]:
    dm.num_workers = num_workers
    return [k for batch in dm.train_dataloader() for k in batch["key"]]


def _shards(tmp_path, n_shards=4, per_shard=3):
    return [
        write_tar(
            tmp_path / f"s{s}.tar", [make_raw_sample(key=f"s{s}_{i}") for i in range(per_shard)]
        )
        for s in range(n_shards)
    ]


def test_every_sample_once_per_epoch_across_workers(tmp_path):
    urls = _shards(tmp_path)
    dm = HandDataModule(urls, batch_size=2, resampled=False, seed=3)
    keys = _keys(dm, num_workers=2)
    assert sorted(keys) == sorted(f"s{s}_{i}" for s in range(4) for i in range(3))


def test_shuffling_is_deterministic_given_the_seed(tmp_path):
    urls = _shards(tmp_path)
    a = _keys(HandDataModule(urls, resampled=False, seed=1), 0)
    b = _keys(HandDataModule(urls, resampled=False, seed=1), 0)
    c = _keys(HandDataModule(urls, resampled=False, seed=2), 0)
    assert a == b
    assert a != c and sorted(a) == sorted(c)


def test_ranks_see_disjoint_shards(tmp_path, monkeypatch):
    urls = _shards(tmp_path)
    seen = []
    for rank in range(2):
        # webdataset reads the rank from the environment when torch.distributed is not up
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = HandDataModule(urls, resampled=False, seed=0)
        seen.append(set(_keys(dm, 0)))
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0] | seen[1]) == 12


def test_resampled_stream_has_the_epoch_size(tmp_path):
    urls = _shards(tmp_path)
    dm = HandDataModule(urls, batch_size=4, resampled=True, epoch_size=10)
    loader: DataLoader = dm.train_dataloader()
    n = sum(len(b["key"]) for b in loader)
    assert n == 10


def test_too_few_shards_for_splitting_is_an_error(tmp_path):
    (url,) = _shards(tmp_path, n_shards=1)
    dm = HandDataModule(url, resampled=False, num_workers=2)
    with pytest.raises(ValueError, match="resampled: true"):
        dm.train_dataloader()


def test_batches_have_the_documented_shapes(synthetic_dir):
    dm = HandDataModule(str(synthetic_dir / "train-*.tar"), batch_size=4, crop={"resolution": 32})
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["pose_image"].shape == (4, 3, 32, 32) and batch["pose_image"].min() >= 0
    assert batch["mask"].shape == (4, 1, 32, 32)
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    assert batch["mask_from_file"].all()  # the synthetic shards carry exact masks
    assert batch["keypoints"].shape == (4, 21, 3)
    assert len(batch["caption"]) == 4
