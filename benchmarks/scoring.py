"""Evaluation scoring throughput: images per second of each part of the evaluator (FID/KID
features, CLIPSIM, the body and hand pose estimators) on the synthetic evaluation images.

    .venv/bin/python -m benchmarks.scoring [--metrics experiments/eval/tiny.yaml] \
        [--images 64] [--batch-size 16] [--resolution 512] [key=value ...]

``--metrics``: an evaluation config (and ``key=value`` overrides), whose ``metrics`` are timed:
the tiny one has random feature and CLIP networks and MediaPipe's real pose models; a
paper-scale one (``experiments/eval/humanart_sd15.yaml eval_set.shards=...``) Inception and CLIP
from local weights. Images are the synthetic validation people (``make synthetic``) resized to
``--resolution``; each part runs over all of them in batches after one warm-up batch, on the GPU
when there is one (the pose estimators run on the CPU). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.transforms.functional import pil_to_tensor

from benchmarks.report import emit, markdown, write_rows
from datamodules.shards import SkipCounter, expand_shards, sample_pipeline
from experiments.config import instantiate, load_config
from experiments.run import limit_threads


def evaluation_images(pattern: str, count: int, resolution: int) -> tuple[torch.Tensor, list]:
    """``count`` images ``[N, 3, R, R]`` in [0, 1] and their captions from schema shards."""

    def samples(src, counter: SkipCounter):
        yield from src

    stream = sample_pipeline(
        expand_shards(pattern), samples, seed=0, shuffle=False, resampled=False
    )
    images, captions = [], []
    for sample in itertools.islice(stream, count):
        pixels = pil_to_tensor(sample.image.convert("RGB")).float()[None] / 255
        images.append(F.interpolate(pixels, size=(resolution, resolution), mode="bilinear"))
        captions.append(sample.caption)
    return torch.cat(images), captions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--metrics", default="experiments/eval/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--shards", default="data/synthetic/val-*.tar")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    threads = limit_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, _ = load_config([args.metrics], args.overrides)
    node = OmegaConf.to_container(cfg, resolve=True)["metrics"]
    evaluator = instantiate(node).to(device).eval()
    images, captions = evaluation_images(args.shards, args.images, args.resolution)
    parts = {"FID/KID features": lambda x, c: evaluator.fid.inception(x),
             "CLIPSIM": lambda x, c: evaluator.clip.update(x, c)}  # fmt: skip
    if evaluator.body_estimator is not None:
        parts["body pose estimator"] = lambda x, c: evaluator.body_estimator.estimate(x)
    if evaluator.hand_estimator is not None:
        parts["hand pose estimator"] = lambda x, c: evaluator.hand_estimator.estimate(x)
    b = args.batch_size
    batches = [
        (images[i : i + b].to(device), captions[i : i + b]) for i in range(0, len(images), b)
    ]
    rows = []
    for name, part in parts.items():
        with torch.no_grad():
            part(*batches[0])  # warm-up: model loading, first-call allocations
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for x, c in batches:
                part(x, c)
            if device == "cuda":
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({
            "part": name, "device": torch.cuda.get_device_name() if device == "cuda" else
            f"cpu, {threads} threads", "resolution": args.resolution, "images": len(images),
            "images_per_second": round(len(images) / seconds, 2),
            "ms_per_image": round(seconds / len(images) * 1e3, 2),
        })  # fmt: skip
        emit(rows[-1])
    print(f"\n{args.metrics}, {len(images)} images at {args.resolution} px, batch {b}\n")
    columns = {"part": "part", "images/s": "images_per_second", "ms/image": "ms_per_image"}
    print(markdown(rows, columns))
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
