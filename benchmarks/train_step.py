"""Training-step throughput of the hand generator at SD 1.5 scale (random weights, same
architecture), through handdiff's own ``from_pretrained`` path.

    python benchmarks/train_step.py --batch-size 8 --resolution 512 [--gradient-checkpointing]

Reports seconds per step, images/s, model FLOPs per step (torch's FlopCounterMode: UNet
forward + backward, VAE encodes, text encoder) and model FLOP utilisation against the GPU's
dense bf16 peak. Results measured on lent GPUs are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from lightning_modules.components import SD_SCHEDULER, clip_tokenizer
from lightning_modules.hand_generator import HandGenerator

# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def write_sd15_architecture(folder: str) -> None:
    """A diffusers-format folder with SD 1.5's architecture and random weights."""
    UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    ).save_pretrained(f"{folder}/unet")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).save_pretrained(f"{folder}/vae")
    CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_act="quick_gelu",
        )
    ).save_pretrained(f"{folder}/text_encoder")
    clip_tokenizer().save_pretrained(f"{folder}/tokenizer")
    DDPMScheduler(**SD_SCHEDULER).save_pretrained(f"{folder}/scheduler")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_sd15_architecture(folder)
        model = HandGenerator(
            components={"pretrained": folder}, gradient_checkpointing=args.gradient_checkpointing
        )
    model.cuda()
    for frozen in (model.vae, model.text_encoder):
        frozen.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    b, r = args.batch_size, args.resolution
    batch = {
        "image": torch.rand(b, 3, r, r, device="cuda") * 2 - 1,
        "pose_image": torch.rand(b, 3, r, r, device="cuda"),
        "mask": (torch.rand(b, 1, r, r, device="cuda") > 0.5).float(),
        "caption": ["a photo of a hand showing a peace sign"] * b,
    }

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.losses(batch, train=True)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result = {
        "gpu": name,
        "batch_size": b,
        "resolution": r,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(b / seconds, 2),
        "tflop_per_step": round(flops / 1e12, 2),
        "mfu": round(flops / seconds / (peak * 1e12), 3) if peak else None,
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
