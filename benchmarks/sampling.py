"""Sampling throughput: handdiff's samplers beside diffusers' pipelines on the same weights, in
one process (50 DDIM steps, classifier-free guidance 7.5, SD 1.5 architecture, random weights).

    .venv/bin/python -m benchmarks.sampling [--batch-size 4] [--resolution 512] [--compile]
    .venv/bin/python -m benchmarks.sampling --tiny --resolution 64 --steps 2   # CPU smoke run

Pairs: plain SD (``PoseConditionedDiffusion``, ``conditioning: none``) beside
``StableDiffusionPipeline``; the ControlNet pose baseline beside
``StableDiffusionControlNetPipeline``. Each pair shares its networks, so ``--compile`` speeds
both sides. Reports images/s and peak memory (CUDA); on a GPU all networks run in bf16.
Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)

from benchmarks.report import emit, markdown, write_rows
from benchmarks.train_step import benchmark_components
from lightning_modules.pose_conditioned import PoseConditionedDiffusion


def pipeline_parts(model: PoseConditionedDiffusion) -> dict:
    """The model's networks as diffusers pipeline components (no safety checker)."""
    return {
        "vae": model.vae, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer,
        "unet": model.unet, "scheduler": DDIMScheduler.from_config(model.noise_scheduler.config),
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile", action="store_true", help="compile the networks (both sides share them)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random components (a smoke run)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as folder:
        components = benchmark_components(folder, args.tiny)
        sampler = {"scheduler": "ddim", "num_inference_steps": args.steps, "guidance_scale": 7.5}
        plain = PoseConditionedDiffusion(
            components, conditioning="none", sampler=sampler, compile=args.compile
        )
        controlnet = PoseConditionedDiffusion(
            components, conditioning="controlnet", train_unet=False, sampler=sampler,
            compile=args.compile,
        )  # fmt: skip
    for model in (plain, controlnet):
        model.to(device, dtype).eval()
        model.configure_model()
    b, r = args.batch_size, args.resolution
    prompts = ["a person waving, full body photo"] * b
    pose = torch.rand(b, 3, r, r, device=device, dtype=dtype)
    sd = StableDiffusionPipeline(**pipeline_parts(plain))
    sd_controlnet = StableDiffusionControlNetPipeline(
        **pipeline_parts(controlnet), controlnet=controlnet.conditioning.controlnet
    )
    for pipe in (sd, sd_controlnet):
        pipe.set_progress_bar_config(disable=True)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    # the pipelines' arguments for what handdiff's samplers take from their config
    same = {"height": r, "width": r, "num_inference_steps": args.steps, "guidance_scale": 7.5,
            "output_type": "pt"}  # fmt: skip
    runs = {
        "handdiff plain SD": lambda: plain.generate(pose, prompts, generator=seeded()),
        "diffusers StableDiffusionPipeline": lambda: sd(prompts, generator=seeded(), **same),
        "handdiff ControlNet baseline": lambda: controlnet.generate(
            pose, prompts, generator=seeded()
        ),
        "diffusers StableDiffusionControlNetPipeline": lambda: sd_controlnet(
            prompts, image=pose, generator=seeded(), **same
        ),
    }
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    for label, run in runs.items():
        with torch.no_grad():
            run()  # warm-up (and compilation)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        rows.append({
            "sampler": label, "device": name, "batch_size": b, "resolution": r,
            "steps": args.steps, "compile": args.compile, "seconds_per_batch": round(seconds, 3),
            "images_per_second": round(b / seconds, 3),
            "max_memory_gib": round(memory, 1) if memory is not None else None,
        })  # fmt: skip
        emit(rows[-1])
    columns = {"sampler": "sampler", "images/s": "images_per_second", "peak GiB": "max_memory_gib"}
    print("\n" + markdown(rows, columns))
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
