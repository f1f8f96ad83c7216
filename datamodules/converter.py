"""The engine every dataset converter runs on: items -> schema samples -> deterministic shards.

A converter lists its source items (cheap metadata: ids, file paths, annotations) and gives a
function turning one item into a sample dict (``__key__``, ``jpg``/``png``, ``json``, ...) or
a :class:`Drop` with a reason. The engine then

- splits items into ``train``/``val`` by a stable hash of their source id (a sample never moves
  between splits when the dataset grows),
- cuts each split, in the converter's order, into shards of ``samples_per_shard`` items, so
  every item has a fixed shard: ``<split>-%06d.tar`` (brace-expandable names),
- converts shards in parallel processes, each written to a temporary file and renamed when
  complete, with its statistics beside it (``<shard>.json``): a rerun skips finished shards,
  so an interrupted conversion resumes, and writes byte-identical tars (fixed tar metadata),
- holds one shard's samples in memory at a time (constant memory in the dataset size),
- writes ``summary.json`` (samples written, dropped per reason, per split) and shows progress.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm


@dataclass
class Drop:
    """An item that does not become a sample, and why (a short, stable reason key)."""

    reason: str


def split_of(source_id: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` of source ids, else ``train``."""
    digest = hashlib.sha256(source_id.encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def unlabel_off_image(keypoints, width: int, height: int) -> np.ndarray:
    """Keypoints ``[K, 3]`` rounded to 0.01 px, those off the ``width`` x ``height`` image set
    to ``(0, 0, 0)`` (unlabelled), as the schema requires."""
    kp = np.asarray(keypoints, dtype=np.float64).copy()
    off = (kp[:, 0] < 0) | (kp[:, 0] > width) | (kp[:, 1] < 0) | (kp[:, 1] > height)
    kp[off] = 0
    return kp.round(2)


def read_rgb(path) -> np.ndarray | Drop:
    """An image file as RGB ``[H, W, 3]`` uint8, or ``Drop("unreadable_image")``."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception:  # PIL raises many types for unreadable or missing files
        return Drop("unreadable_image")


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: Sequence[dict]) -> None:
    """Write samples as a WebDataset tar with fixed metadata (mtime 0, root owner) so the same
    samples always give the same bytes; written to ``<path>.tmp`` and renamed when complete."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = sample[ext]
                data = data if isinstance(data, bytes) else json.dumps(data).encode()
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def _convert_shard(job) -> dict:
    convert, items, path = job
    samples, drops = [], Counter()
    for item in items:
        result = convert(item)
        if isinstance(result, Drop):
            drops[result.reason] += 1
        else:
            samples.append(result)
    stats = {"written": len(samples), "dropped": dict(sorted(drops.items()))}
    write_tar(path, samples)
    Path(str(path) + ".json").write_text(json.dumps(stats))
    return stats


def convert_dataset(
    items: Sequence,
    source_id: Callable[[object], str],
    convert: Callable[[object], dict | Drop],
    out: str | os.PathLike,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.05,
    processes: int = 1,
    desc: str = "converting",
) -> dict:
    """Convert ``items`` into shards under ``out``; returns (and saves) the summary.

    ``convert`` must be picklable (a module-level function or ``functools.partial``) when
    ``processes > 1``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list] = {"train": [], "val": []}
    for item in items:
        by_split[split_of(source_id(item), val_fraction)].append(item)
    jobs, done = [], []
    for split, split_items in by_split.items():
        for k in range(0, len(split_items), samples_per_shard):
            path = out / f"{split}-{k // samples_per_shard:06d}.tar"
            stats_file = Path(str(path) + ".json")
            if path.is_file() and stats_file.is_file():
                done.append((split, json.loads(stats_file.read_text())))
            else:
                jobs.append((split, (convert, split_items[k : k + samples_per_shard], path)))
    results = list(done)
    with tqdm(total=len(jobs) + len(done), initial=len(done), desc=desc, unit="shard") as bar:
        if processes > 1:
            with ProcessPoolExecutor(processes) as pool:
                for (split, _), stats in zip(
                    jobs, pool.map(_convert_shard, [j for _, j in jobs]), strict=True
                ):
                    results.append((split, stats))
                    bar.update()
        else:
            for split, job in jobs:
                results.append((split, _convert_shard(job)))
                bar.update()
    summary: dict = {"items": len(items), "resumed_shards": len(done)}
    for split in by_split:
        dropped = Counter()
        for _, stats in (r for r in results if r[0] == split):
            dropped.update(stats["dropped"])
        summary[split] = {
            "shards": sum(1 for r in results if r[0] == split),
            "written": sum(stats["written"] for s, stats in results if s == split),
            "dropped": dict(sorted(dropped.items())),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def add_engine_arguments(parser: argparse.ArgumentParser, val_fraction: float = 0.05) -> None:
    """The command-line options every converter shares."""
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--val-fraction", type=float, default=val_fraction)
    parser.add_argument("--processes", type=int, default=1)


def convert_from_args(items, source_id, convert, args: argparse.Namespace, desc: str) -> dict:
    """:func:`convert_dataset` with the shared options; prints and returns the summary."""
    summary = convert_dataset(
        items,
        source_id,
        convert,
        args.out,
        args.samples_per_shard,
        args.val_fraction,
        args.processes,
        desc=desc,
    )
    print(json.dumps(summary, indent=2))
    return summary
