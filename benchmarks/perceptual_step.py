"""Cost of the mask-aware perceptual loss (issue 17): the ControlNet baseline's training step at
SD 1.5 architecture (random weights through handdiff's ``from_pretrained`` path, LPIPS on a
full VGG16 and the face term on a full ResNet-50, both loaded from local state-dict files) with
and without the loss.

    python -m benchmarks.perceptual_step [--batch-size 1] [--resolution 512] [--steps 2]

Variants, each in its own process so that peak memory is its own:

- ``off``: the method's loss alone;
- ``decoded``: every sample decoded (``max_timestep`` 1000) with gradient checkpointing in the
  VAE decoder: the cost of a step in which every sample has t <= T;
- ``decoded_no_checkpointing``: the same without checkpointing.

At the default T = 100 a sample is decoded with probability 101/1000, so the expected step time
is ``off + 0.101 (decoded - off)``; the table reports it. Peak memory is that of the timed steps
above what is resident before them (weights, optimiser state): ``torch.cuda.max_memory_allocated``
on a GPU (bf16 autocast, frozen parts in bf16), the process's resident set sampled every 5 ms on
CPU (fp32; torch keeps no CPU allocator statistics). Random images hold no
face MediaPipe would find, so each image gets one face box (a quarter of the image) and the
face network runs as on real photos.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time

import torch
from torchvision.models import resnet50, vgg16

from benchmarks.report import emit, write_rows
from benchmarks.train_step import module_step, write_sd15_architecture
from lightning_modules.pose_conditioned import PoseConditionedDiffusion

VARIANTS = {
    "off": None,
    "decoded": {"max_timestep": 1000, "decoder_checkpointing": True},
    "decoded_no_checkpointing": {"max_timestep": 1000, "decoder_checkpointing": False},
}
DECODE_PROBABILITY = 101 / 1000  # P(t <= 100) for t uniform on 0..999


class ResidentPeak:
    """Peak resident set size (GiB) of this process while the context is open, sampled from
    ``/proc/self/statm``."""

    def __enter__(self) -> ResidentPeak:
        self.resident = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**30

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(variant: str, batch_size: int, resolution: int, steps: int) -> dict:
    """Seconds per training step and peak memory of one variant."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        write_sd15_architecture(folder)
        perceptual = None
        if VARIANTS[variant] is not None:
            torch.save(vgg16().state_dict(), f"{folder}/vgg16.pth")
            torch.save(resnet50(num_classes=8631).state_dict(), f"{folder}/face.pth")
            perceptual = {
                "networks": "pretrained",
                "vgg_weights": f"{folder}/vgg16.pth",
                "face_weights": f"{folder}/face.pth",
                **VARIANTS[variant],
            }
        model = PoseConditionedDiffusion(
            components={"pretrained": folder},
            conditioning="controlnet",
            train_unet=False,
            perceptual=perceptual,
        )
    if perceptual is not None:
        quarter = resolution // 4
        model.face_boxes = lambda images: [
            (i, quarter, quarter, 2 * quarter, 2 * quarter) for i in range(len(images))
        ]
    model.to(device)
    if cuda:
        for frozen in (model.vae, model.text_encoder, model.unet):
            frozen.to(torch.bfloat16)
    model.train()
    b, r = batch_size, resolution
    person = torch.tensor([[0.2 * r, 0.1 * r, 1.0], [0.8 * r, 0.95 * r, 1.0]])
    batch = {
        "image": torch.rand(b, 3, r, r, device=device) * 2 - 1,
        "pose_image": torch.rand(b, 3, r, r, device=device),
        "caption": ["a person waving, full body photo"] * b,
        "body_keypoints": [person[None].to(device) for _ in range(b)],
    }

    step = module_step(model, batch, device)

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**30
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed pages back first
    with ResidentPeak() as sampler:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30 - resident
    else:
        peak = sampler.peak - sampler.resident
    threads = torch.get_num_threads()
    return {
        "variant": variant,
        "device": torch.cuda.get_device_name() if cuda else f"cpu, {threads} threads",
        "precision": "bf16 autocast" if cuda else "fp32",
        "batch_size": b,
        "resolution": r,
        "seconds_per_step": round(seconds, 3),
        "resident_gib": round(resident if cuda else sampler.resident, 2),
        "step_peak_gib": round(peak, 2),
    }


def table(rows: list[dict]) -> str:
    """Markdown table of the variants plus the expected step at T = 100."""
    off = next(row for row in rows if row["variant"] == "off")["seconds_per_step"]
    lines = [
        "| variant | s/step | × off | step peak above resident (GiB) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        s = row["seconds_per_step"]
        lines.append(f"| {row['variant']} | {s:.3f} | {s / off:.2f} | {row['step_peak_gib']:.2f} |")
    decoded = next(row for row in rows if row["variant"] == "decoded")["seconds_per_step"]
    expected = off + DECODE_PROBABILITY * (decoded - off)
    lines.append(f"| expected at T = 100 | {expected:.3f} | {expected / off:.2f} | – |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variant", choices=list(VARIANTS), help="measure one variant here")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(measure(args.variant, args.batch_size, args.resolution, args.steps)))
        return
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, "-m", "benchmarks.perceptual_step", "--variant", variant,
                   "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
                   "--steps", str(args.steps)]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        emit(rows[-1])
    write_rows(rows, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
