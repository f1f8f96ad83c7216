"""Latent caches: training examples with their VAE posteriors (and optionally text-encoder
states) computed once, so that training skips the per-step VAE encodes.

A cache is a folder: ``train-NNNNNN.tar`` shards (webdataset; per example ``latents.safetensors``
and ``meta.json``) and ``cache.json``, the manifest, written last (a folder without it is an
unfinished cache). Each example holds every orientation the training stream can draw
(unflipped and, when flips are on, flipped; a flipped hand crop has a mirrored image, the other
hand's skeleton palette and swapped side words, so it is encoded on its own), each tensor
``[O, ...]``:

- ``latent_mean``, ``latent_std`` ``[O, 4, h, w]``: the VAE posterior of the image (unscaled,
  fp32), so training still draws ``mean + std * eps`` as the uncached path does;
- ``pose_latent`` ``[O, C, h, w]``: the pose condition as the model consumes it (the skeleton's
  posterior mode for ``concat``), or ``pose_image`` ``[O, 3, H, W]`` uint8 when the condition is
  the skeleton itself (ControlNet);
- ``mask_latent`` ``[O, 1, h, w]``: the hand mask area-averaged to latent resolution;
- ``text_embedding`` ``[O, 77, D]`` (optional): the text encoder's output for the caption;
- the datamodule's pass-through tensors (e.g. ``body_keypoints``), as they are.

``meta.json`` holds each orientation's plain fields (caption, key, side, ...).

The manifest records what the cache depends on: the encoder (a hash of the VAE's weights,
scaling, conditioning kind, text encoder), the example settings (datamodule, crop settings,
resolution) and the source shards (size and a hash of their first and last MiB). A cache that
disagrees with the run on any of these is refused, naming the key.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from datamodules.shards import SkipCounter

FORMAT = "handdiff-latent-cache/1"
MANIFEST = "cache.json"
_HASHED = 2**20  # bytes hashed at each end of a source shard


class StaleCacheError(ValueError):
    """A latent cache that does not match the run; the message names the key that differs."""


def source_fingerprint(urls: Sequence[str]) -> list[dict]:
    """``{name, bytes, sha256}`` of each source shard (sha256 of its first and last MiB: a
    changed or replaced shard is caught without reading terabytes)."""
    out = []
    for url in urls:
        path = Path(url)
        if not path.is_file():
            raise ValueError(f"{url!r}: a latent cache is made from local shard files only")
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            digest.update(f.read(_HASHED))
            if size > 2 * _HASHED:
                f.seek(size - _HASHED)
            digest.update(f.read(_HASHED))
        out.append({"name": path.name, "bytes": size, "sha256": digest.hexdigest()})
    return out


def read_manifest(folder: str | Path) -> dict:
    """The manifest of the cache in ``folder``; a clear error for a missing or unfinished one."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"latent_cache={str(folder)!r}: no such folder (make cache-latents)"
        )
    if not path.is_file():
        raise StaleCacheError(
            f"latent_cache={str(folder)!r}: no {MANIFEST} (an unfinished cache): rebuild it "
            "with make cache-latents"
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise StaleCacheError(f"{path}: not a cache manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise StaleCacheError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return manifest


def check_manifest(manifest: dict, expected: dict, folder: str | Path, part: str) -> None:
    """Refuse the cache when ``manifest[part]`` differs from ``expected`` at any key."""
    cached = manifest.get(part, {})
    for key in [*expected, *(k for k in cached if k not in expected)]:
        if cached.get(key) != expected.get(key):
            raise StaleCacheError(
                f"latent_cache={str(folder)!r} is stale: {part}.{key} is "
                f"{json.dumps(cached.get(key))[:200]} in the cache but "
                f"{json.dumps(expected.get(key))[:200]} for this run; rebuild it with "
                "make cache-latents"
            )


def encode_example(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, bytes]:
    """One cache member set: tensors (contiguous, on CPU) and JSON metadata."""
    payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return {"latents.safetensors": save_tensors(payload), "meta.json": json.dumps(meta).encode()}


def cache_shards(folder: str | Path) -> list[dict]:
    """``{name, bytes}`` of a cache's own shards, in order (recorded in the manifest: a cache
    copied in part is refused)."""
    return [
        {"name": p.name, "bytes": p.stat().st_size}
        for p in sorted(Path(folder).glob("train-*.tar"))
    ]


def cached_examples(
    src: Iterable[dict], counter: SkipCounter, tensors: Sequence[str] = ()
) -> Iterator[dict]:
    """Raw webdataset samples of a cache shard -> ``{"tensors", "meta"}`` (safetensors and
    JSON only: nothing in a cache file can run code); each must hold the ``tensors`` the
    manifest lists."""
    for raw in src:
        where = f"cache sample {raw.get('__key__')!r} in {raw.get('__url__')!r}"
        try:
            entry = {
                "tensors": load_tensors(raw["latents.safetensors"]),
                "meta": json.load(io.BytesIO(raw["meta.json"])),
            }
        except Exception as error:  # safetensors' own error type derives from Exception only
            raise StaleCacheError(
                f"{where}: unreadable ({type(error).__name__}: {error})"
            ) from None
        missing = set(tensors) - set(entry["tensors"])
        if missing:
            raise StaleCacheError(f"{where}: no {sorted(missing)} (the manifest lists them)")
        yield entry


def cached_orientation(
    cached: dict, augment: bool, rng: random.Random, flip_prob: float
) -> Iterator[dict]:
    """The example of one cached entry: flipped with ``flip_prob`` when ``augment`` (the one
    draw the uncached stream makes per example), else the unflipped orientation."""
    tensors, views = cached["tensors"], cached["meta"]["views"]
    flip = augment and rng.random() < flip_prob
    o = int(flip and len(views) > 1)
    example = {k: v[o] for k, v in tensors.items()}
    if "pose_image" in example:  # stored as uint8, the skeleton's own precision
        example["pose_image"] = example["pose_image"].float() / 255
    example.update(views[o])
    yield example


def view_metadata(view: dict) -> dict:
    """The JSON-able fields of an example (caption, key, side, ...), cached with its tensors."""
    return {k: v for k, v in view.items() if isinstance(v, str | bool | int | float)}
