"""Training-step throughput of the hand generator at SD 1.5 scale (random weights, same
architecture), through handdiff's own ``from_pretrained`` path.

    python benchmarks/train_step.py --batch-size 8 --resolution 512 [--gradient-checkpointing]

Reports seconds per step, images/s, model FLOPs per step (torch's FlopCounterMode: UNet
forward + backward, VAE encodes, text encoder) and model FLOP utilisation against the GPU's
dense bf16 peak, for handdiff's step and, in the same process on the same components, for the
step of diffusers' ``examples/text_to_image/train_text_to_image.py`` (plain 4-channel UNet, one
VAE encode, epsilon MSE) that a user would otherwise start from. Results measured on lent GPUs
are in benchmarks/RESULTS.md.
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

    def handdiff_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.losses(batch, train=True)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The reference: diffusers' text-to-image fine-tuning step on an unmodified SD UNet.
    reference_unet = UNet2DConditionModel.from_config(
        {**dict(model.unet.config), "in_channels": 4, "out_channels": 4}
    ).cuda()
    reference_unet.train()
    if args.gradient_checkpointing:
        reference_unet.enable_gradient_checkpointing()
    reference_optimizer = torch.optim.AdamW(reference_unet.parameters(), lr=1e-5)
    ids = model.tokenizer(
        batch["caption"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids.cuda()
    scheduler = model.noise_scheduler

    def reference_step() -> None:
        with torch.no_grad():
            latents = model.vae.encode(batch["image"].to(torch.bfloat16)).latent_dist.sample()
            latents = latents.float() * model.vae.config.scaling_factor
            text = model.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device="cuda")
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = reference_unet(noisy, t, text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)

    model.train()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    for label, step in (("handdiff", handdiff_step), ("diffusers_example", reference_step)):
        for _ in range(3):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        result = {
            "step": label,
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
