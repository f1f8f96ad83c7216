"""Write a latent cache of an experiment's training data (``datamodules.latent_cache``).

    .venv/bin/python -m experiments.cache_latents CONFIG [more.yaml] [key=value ...] --out DIR
        [--text] [--batch-size 16] [--per-shard 1000]
    make cache-latents CONFIG=experiments/hand/tiny.yaml CACHE_OUT=data/latent_cache/hand_tiny

The model and datamodule are built from the same config the training uses (so the VAE, crop
settings and source shards recorded in the manifest are the run's); every training crop is
encoded once per orientation the stream can draw, in fp32. Train from it with
``data.params.latent_cache=DIR`` (``experiments/hand/tiny_cached.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import webdataset as wds
from omegaconf import OmegaConf
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from datamodules.latent_cache import (
    FORMAT,
    MANIFEST,
    cache_shards,
    encode_example,
    source_fingerprint,
    view_metadata,
)
from experiments.config import ConfigError, load_config
from experiments.notices import configure_logging
from experiments.run import _build, limit_threads

BATCHED = ("image", "pose_image", "mask")


def batches(entries: Iterator[list[dict]], size: int) -> Iterator[list[list[dict]]]:
    chunk: list[list[dict]] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_cache(model, datamodule, out: Path, text: bool, batch_size: int, per_shard: int) -> dict:
    """Encode ``datamodule.cache_entries()`` with ``model.latent_cache_tensors`` into shards of
    ``out``; the manifest is written last. Returns it."""
    # what the cache depends on, taken before hours of encoding (and before any cast)
    identity = model.cache_identity(text=text)
    sources = {"shards": source_fingerprint(datamodule.train_urls)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    count = orientations = 0
    names: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for chunk in tqdm(
            batches(datamodule.cache_entries(), batch_size), desc="caching", unit="batch"
        ):
            orientations = len(chunk[0])
            flat = [view for entry in chunk for view in entry]
            keys = [k for k in (*BATCHED, *datamodule.cache_passthrough) if k in flat[0]]
            batch = {k: default_collate([v[k] for v in flat]).to(device) for k in keys}
            batch["caption"] = [v["caption"] for v in flat]
            tensors = model.latent_cache_tensors(batch, text=text)
            tensors.update({k: batch[k] for k in datamodule.cache_passthrough if k in batch})
            names = sorted(tensors)
            for i, entry in enumerate(chunk):
                rows = slice(i * orientations, (i + 1) * orientations)
                meta = {"views": [view_metadata(view) for view in entry]}
                # member keys are our own counters: sample keys from shards never name files
                own = {k: v[rows] for k, v in tensors.items()}
                sink.write({"__key__": f"{count:09d}", **encode_example(own, meta)})
                count += 1
    if count == 0:
        for empty in out.glob("train-*.tar"):
            empty.unlink()
        raise ConfigError("cache-latents: the training shards gave no example")
    manifest = {
        "format": FORMAT,
        "encoder": identity,
        "examples": datamodule.cache_settings(),
        "sources": sources,
        "cache": {"shards": cache_shards(out)},
        "tensors": names,
        "orientations": orientations,
        "count": count,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=".venv/bin/python -m experiments.cache_latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("args", nargs="+", help="config files and key=value overrides")
    parser.add_argument("--out", required=True, help="the cache folder (new or empty)")
    parser.add_argument("--text", action="store_true", help="cache the text encoder's states too")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=1000, help="examples per cache shard")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a cache in --out (only its own files)"
    )
    ns = parser.parse_args(argv)
    limit_threads()
    configure_logging()
    out = Path(ns.out)
    try:
        cfg, provenance = load_config(
            [a for a in ns.args if "=" not in a], [a for a in ns.args if "=" in a]
        )
        container = OmegaConf.to_container(cfg, resolve=True)
        if (container["data"].get("params") or {}).get("latent_cache"):
            raise ConfigError(
                "cache-latents reads the source shards: give the config without "
                "data.params.latent_cache"
            )
        datamodule = _build("data", container["data"], provenance)
        datamodule.cache_settings()  # a datamodule without a latent cache says so here
        model = _build("model", container["model"], provenance)
        if not hasattr(model, "latent_cache_tensors"):
            raise ConfigError(f"model: {type(model).__name__} trains from pixels only")
        if ns.overwrite and out.is_dir():  # only once the config has been built
            for file in [*out.glob("train-*.tar"), out / MANIFEST]:
                file.unlink(missing_ok=True)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"--out {out}: not empty (a cache is written into a new or empty folder; "
                "--overwrite replaces a cache's own files)"
            )
        manifest = write_cache(model, datamodule, out, ns.text, ns.batch_size, ns.per_shard)
    except (ConfigError, ValueError) as exc:
        print(f"cache-latents: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"cached {manifest['count']} examples x {manifest['orientations']} orientations: {out}/")


if __name__ == "__main__":
    main()
