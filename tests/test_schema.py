"""Schema validation: good samples pass, each kind of bad one is rejected with its reason,
and the reader skips and counts bad samples instead of crashing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datamodules.hand_datamodule import HandDataModule
from datamodules.schema import SKIP_REASONS, SampleError, decode_sample
from tests.conftest import encode_image, make_raw_sample, write_tar


def _record(**people_changes) -> bytes:
    raw = make_raw_sample()
    record = json.loads(raw["json"])
    record["people"][0].update(people_changes)
    return json.dumps(record).encode()


def test_good_sample_is_decoded():
    sample = decode_sample(make_raw_sample(key="abc"))
    assert sample.key == "abc"
    assert sample.image.size == (64, 64)
    assert sample.caption == "a person raising the right hand"
    (person,) = sample.people
    assert person.body.shape == (17, 3) and person.left_hand is None
    assert person.right_hand.shape == (21, 3)
    assert person.right_hand[6, :2].tolist() == [24.0, 24.0]
    assert sample.mask is None


def test_caption_falls_back_to_txt():
    record = json.loads(make_raw_sample()["json"])
    del record["caption"]
    sample = decode_sample(make_raw_sample(json=json.dumps(record).encode(), txt=b" from txt\n"))
    assert sample.caption == "from txt"


def test_mask_is_decoded_as_single_channel():
    mask = np.zeros((64, 64, 3), np.uint8)  # an RGB mask file still gives one channel
    mask[10:20, 30:40] = 255
    sample = decode_sample(make_raw_sample(**{"mask.png": encode_image(mask)}))
    assert sample.mask.shape == (64, 64)
    assert sample.mask.sum() == 100 * 255


BAD = {
    "missing_key": make_raw_sample(json=None),
    "bad_image": make_raw_sample(png=b"not an image"),
    "bad_json": make_raw_sample(json=b"{not json"),
    "bad_schema": make_raw_sample(json=b'{"width": 64, "height": 64}'),
    "bad_keypoints": make_raw_sample(json=_record(body=[[1, 2, 2]] * 16)),
    "keypoints_off_image": make_raw_sample(json=_record(right_hand=[[70, 5, 2]] * 21)),
    "bad_mask": make_raw_sample(**{"mask.png": encode_image(np.zeros((32, 32), np.uint8))}),
    "bad_key": make_raw_sample(key="../bad_bad_key"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_sample_is_rejected_with_reason(reason):
    with pytest.raises(SampleError) as info:
        decode_sample(BAD[reason])
    assert info.value.reason == reason


def test_unlabelled_keypoints_may_lie_anywhere():
    # v = 0 keypoints are placeholders (often 0, 0 or off-image): not a schema violation
    hand = [[20, 20, 2]] * 20 + [[-5, 500, 0]]
    assert decode_sample(make_raw_sample(json=_record(right_hand=hand))).people


def test_size_mismatch_between_json_and_image_is_rejected():
    record = json.loads(make_raw_sample()["json"])
    record["width"] = 65
    with pytest.raises(SampleError, match="65x64") as info:
        decode_sample(make_raw_sample(json=json.dumps(record).encode()))
    assert info.value.reason == "bad_schema"


def test_reader_skips_and_counts_bad_samples(tmp_path, caplog):
    good = [make_raw_sample(key=f"good{i}") for i in range(5)]
    bad = [BAD[r] if r == "bad_key" else dict(BAD[r], __key__=f"bad_{r}") for r in sorted(BAD)]
    # interleave so that skips are reported by the next good example
    samples = [s for pair in zip(good, bad, strict=False) for s in pair] + bad[len(good) :]
    samples.append(make_raw_sample(key="good_last"))
    shard = write_tar(tmp_path / "mixed.tar", samples)
    # shuffle_buffer=1 keeps the order: counts travel with the next good example, so the
    # stream must not end on a bad sample for all of them to arrive
    dm = HandDataModule(shard, batch_size=32, resampled=False, shuffle_buffer=1)
    with caplog.at_level("WARNING"):
        (batch,) = list(dm.train_dataloader())
    assert sorted(batch["key"]) == sorted([f"good{i}" for i in range(5)] + ["good_last"])
    counts = batch["skipped"].sum(0)
    assert counts.tolist() == [int(r in BAD) for r in SKIP_REASONS]
    assert int(counts.sum()) == len(BAD)
    # each skipped sample is named in the log with its shard
    for reason in BAD:
        assert any(
            f"bad_{reason}" in r.message and "mixed.tar" in r.message for r in caplog.records
        )
    assert batch["mask_from_file"].tolist() == [False] * 6
    assert torch.is_tensor(batch["is_right"])
