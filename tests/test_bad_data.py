"""Bad data never hangs or kills a run: empty shard sets are refused before training, a stream
with nothing usable stops with a message, damaged shards and samples are skipped, named and
counted, and converters write no empty shards."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pytest

from datamodules.converter import add_engine_arguments, convert_from_args
from datamodules.hand_datamodule import HandDataModule
from datamodules.schema import SKIP_REASONS
from datamodules.shards import ShardError
from tests.conftest import make_raw_sample, write_tar


def _empty_tar(path) -> str:
    with tarfile.open(path, "w"):
        pass
    return str(path)


def test_a_set_of_empty_shards_is_refused_before_training(tmp_path):
    shards = [_empty_tar(tmp_path / f"e{i}.tar") for i in range(3)]
    with pytest.raises(ShardError, match="every shard is empty"):
        HandDataModule(shards)
    # one non-empty shard among empty ones is fine
    good = write_tar(tmp_path / "good.tar", [make_raw_sample("k0")])
    HandDataModule([*shards, good])


@pytest.mark.parametrize("bad", ["bad_json", "no_hands"])
def test_an_endless_stream_with_nothing_usable_stops_with_a_message(tmp_path, bad):
    """Every sample skipped (bad json) or yielding no hand crop: the resampled training stream
    used to spin forever; it now stops after 20 shard draws per shard without an example."""
    change = {"json": b"{not json"} if bad == "bad_json" else {}
    samples = [make_raw_sample(f"k{i}", **change) for i in range(2)]
    if bad == "no_hands":
        for sample in samples:
            record = json.loads(sample["json"])
            record["people"][0]["right_hand"] = None
            sample["json"] = json.dumps(record).encode()
    shards = [write_tar(tmp_path / f"s{i}.tar", samples) for i in range(2)]
    dm = HandDataModule(shards, batch_size=2, resampled=True, epoch_size=10)
    with pytest.raises(ShardError, match="no usable sample in 40 shard reads"):
        next(iter(dm.train_dataloader()))


def _truncated(path, keys: list[str]) -> str:
    write_tar(path, [make_raw_sample(k) for k in keys])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # cut inside the third sample
    return str(path)


def _read_all(dm: HandDataModule) -> tuple[list[str], list[int]]:
    keys, skipped = [], [0] * len(SKIP_REASONS)
    for batch in dm.train_dataloader():
        keys += batch["key"]
        skipped = [a + int(b) for a, b in zip(skipped, batch["skipped"].sum(0), strict=True)]
    return keys, skipped


def test_a_truncated_shard_is_read_up_to_the_damage_and_named(tmp_path, caplog):
    bad = _truncated(tmp_path / "cut.tar", ["a0", "a1", "a2"])
    good = write_tar(tmp_path / "good.tar", [make_raw_sample(f"b{i}") for i in range(3)])
    dm = HandDataModule([bad, good], batch_size=1, resampled=False)
    with caplog.at_level(logging.WARNING):
        keys, _ = _read_all(dm)
    assert {"b0", "b1", "b2"} <= set(keys) and "a0" in keys and "a2" not in keys
    shard_warnings = [r.getMessage() for r in caplog.records if "skipped what was left" in
                      r.getMessage()]  # fmt: skip
    assert len(shard_warnings) == 1 and "cut.tar" in shard_warnings[0]


def test_a_duplicate_member_is_named_and_skipped(tmp_path, caplog):
    sample = make_raw_sample("k0")
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k0.png", sample["png"]), ("k0.png", sample["png"]),
                           ("k0.json", sample["json"])]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dm = HandDataModule(str(path), batch_size=1, resampled=False)
    with caplog.at_level(logging.WARNING):
        keys, _ = _read_all(dm)
    assert keys == ["k0"]
    assert any("dup.tar" in r.getMessage() and "duplicate" in r.getMessage()
               for r in caplog.records)  # fmt: skip


@pytest.mark.parametrize("bbox", [["a", "b", "c", "d"], [None, 0, 1, 1], [0, 0, 1], "box"])
def test_a_bbox_that_is_not_four_numbers_is_skipped(tmp_path, bbox, caplog):
    bad = make_raw_sample("bad")
    record = json.loads(bad["json"])
    record["people"][0]["bbox"] = bbox
    bad["json"] = json.dumps(record).encode()
    shard = write_tar(tmp_path / "s.tar", [bad, make_raw_sample("good")])
    with caplog.at_level(logging.WARNING):
        keys, _ = _read_all(HandDataModule(shard, batch_size=1, resampled=False))
    assert keys == ["good"]
    (warning,) = [r.getMessage() for r in caplog.records if "'bad'" in r.getMessage()]
    assert "bad_schema" in warning and "bbox must be 4 numbers" in warning


def test_a_converter_that_writes_nothing_fails_and_leaves_no_empty_shard(tmp_path):
    import argparse

    from datamodules.converter import Drop

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--samples-per-shard", "2"])
    with pytest.raises(SystemExit, match=r"nothing written.*'no_person': 3"):
        convert_from_args([1, 2, 3], str, lambda item: Drop("no_person"), args, "test")
    assert not list((tmp_path / "out").glob("*.tar"))


def test_tiny_images_and_tiny_hands_are_skipped_with_a_reason(tmp_path, caplog):
    tiny_image = make_raw_sample("tiny", size=16)  # below the 32 px default
    record = json.loads(tiny_image["json"])
    record["people"][0]["right_hand"] = None
    record["people"][0]["body"] = [[1, 1, 2]] * 17
    tiny_image["json"] = json.dumps(record).encode()
    small_hand = make_raw_sample("small")
    record = json.loads(small_hand["json"])
    record["people"][0]["right_hand"] = [[20 + i % 3, 20 + i // 7, 2] for i in range(21)]
    small_hand["json"] = json.dumps(record).encode()
    shard = write_tar(tmp_path / "s.tar", [tiny_image, small_hand, make_raw_sample("good")])
    dm = HandDataModule(shard, batch_size=8, resampled=False, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        (batch,) = list(dm.train_dataloader())
    assert batch["key"] == ["good"]
    assert int(batch["skipped"].sum(0)[SKIP_REASONS.index("too_small")]) == 2
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "16x16, below 32 px" in messages and "right hand spans 2.0 px < 8.0" in messages


def test_a_truncated_result_image_is_made_again_and_named(tmp_path, caplog):
    from PIL import Image

    from datamodules.evaluation_datamodule import read_resized
    from datamodules.pose_datamodule import not_done

    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert not not_done("good", tmp_path)
    with caplog.at_level(logging.WARNING):
        assert not_done("cut", tmp_path)
    assert not (tmp_path / "cut.png").exists() and "cut.png" in caplog.text
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"cut\.png"):
        read_resized(tmp_path / "cut.png", 16)


def test_resuming_into_shards_of_another_source_is_refused(tmp_path):
    from datamodules.converter import convert_dataset

    def convert(item):
        return {"__key__": item, "json": b"{}"}

    out = tmp_path / "out"
    convert_dataset([f"k{i}" for i in range(40)], str, convert, out, samples_per_shard=10)
    with pytest.raises(ValueError, match=r"another source or split.*'items': 40.*'items': 20"):
        convert_dataset([f"n{i}" for i in range(20)], str, convert, out, samples_per_shard=10)
    # the same source resumes
    convert_dataset([f"k{i}" for i in range(40)], str, convert, out, samples_per_shard=10)


_ORPHANS = """
import os, sys, time
from pathlib import Path
from datamodules.converter import convert_dataset

PIDS = Path(sys.argv[1])

def slow(item):
    (PIDS / str(os.getpid())).touch()
    time.sleep(120)

if __name__ == "__main__":
    convert_dataset([f"k{i}" for i in range(4)], str, slow, PIDS.parent / "out",
                    samples_per_shard=1, processes=2)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(
                line.split()[1:2] == ["Z"] for line in status if line.startswith("State")
            )
    except FileNotFoundError:
        return False


def test_converter_workers_die_with_their_parent(tmp_path):
    """convert_dataset --processes 2, its parent killed: the workers go too (they used to keep
    converting, ~780 MB each)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script, pids = tmp_path / "orphans.py", tmp_path / "pids"
    script.write_text(_ORPHANS)
    pids.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, str(script), str(pids)], env=env)
    deadline = time.time() + 60
    while len(list(pids.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.1)  # both workers are converting (their initializer has run)
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    alive = [p for p in workers if _alive(p)]
    for pid in alive:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive
