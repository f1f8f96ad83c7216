"""Shared fixtures: offline settings, synthetic shards, a tiny hand generator."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from datamodules.synthetic import write_shards

    out = tmp_path_factory.mktemp("synthetic")
    write_shards(out, 48, "train", seed=0, size=128, per_shard=12)
    write_shards(out, 16, "val", seed=0, size=128, per_shard=8)
    return out


def encode_image(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def make_raw_sample(key: str = "k0", size: int = 64, **changes) -> dict:
    """A valid raw sample (dict of bytes) with one person and a right hand; ``changes``
    replace entries (``None`` removes one)."""
    image = np.full((size, size, 3), 90, np.uint8)
    hand = [[20 + (i % 5) * 4, 20 + (i // 5) * 4, 2] for i in range(21)]
    record = {
        "width": size,
        "height": size,
        "caption": "a person raising the right hand",
        "source": {"dataset": "test", "id": key},
        "people": [
            {
                "bbox": [5, 5, 50, 50],
                "body": [[10 + i, 10 + i, 2] for i in range(17)],
                "left_hand": None,
                "right_hand": hand,
            }
        ],
    }
    raw = {
        "__key__": key,
        "__url__": "test.tar",
        "png": encode_image(image),
        "json": json.dumps(record).encode(),
    }
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    return raw


def write_tar(path, samples: list[dict]) -> str:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="session")
def tiny_generator():
    from lightning_modules.hand_generator import HandGenerator

    return HandGenerator(components={"tiny": True})
