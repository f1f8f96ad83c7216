"""Training-step throughput at SD 1.5 scale (random weights, same architecture, through
handdiff's own ``from_pretrained`` path), side by side in one process with the diffusers
example a user would otherwise run.

    .venv/bin/python -m benchmarks.train_step --batch-size 8 --resolution 512 \
        [--gradient-checkpointing] [--compile] [--out rows.json]
    .venv/bin/python -m benchmarks.train_step --tiny --resolution 64 --batch-size 2 --steps 1

Steps: the hand generator and the ControlNet baseline, each from pixels and from cached latents
(the tensors a latent cache holds). The hand generator runs beside
``examples/text_to_image/train_text_to_image.py`` (plain 4-channel UNet, one VAE encode,
epsilon MSE), the ControlNet baseline beside ``examples/controlnet/train_controlnet.py``
(frozen UNet, trained ControlNet). Reports seconds per step, images/s,
model FLOPs per step (torch's FlopCounterMode) and model FLOP utilisation against the GPU's
dense bf16 peak, and each step's peak memory above the resident weights. On a GPU: bf16
autocast, frozen parts in bf16, fused AdamW; ``--compile`` adds torch.compile and channels-last
to handdiff's networks. ``--tiny`` runs the same code on tiny random components (CPU smoke
run). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarks.report import emit, markdown, write_rows
from lightning_modules.components import SD_SCHEDULER, clip_tokenizer
from lightning_modules.hand_generator import HandGenerator
from lightning_modules.pose_conditioned import PoseConditionedDiffusion

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


def benchmark_components(folder: str, tiny: bool) -> dict:
    """``components`` of tiny random networks, or of SD 1.5's architecture written to
    ``folder`` and loaded through ``from_pretrained``."""
    if tiny:
        return {"tiny": True}
    write_sd15_architecture(folder)
    return {"pretrained": folder}


def timed(step, steps: int, device: str) -> tuple[float, float, float | None]:
    """``(seconds per step, model FLOPs per step, peak memory GiB)`` after 3 warm-up steps;
    memory (CUDA only) is the step's peak above what was allocated before it: every variant's
    networks and optimiser states stay resident in this one process."""
    cuda = device == "cuda"
    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    resident = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - resident) / 2**30 if cuda else None
    return (time.perf_counter() - start) / steps, counter.get_total_flops(), peak


def optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def module_step(module, inputs: dict, device: str, **adamw) -> Callable[[], None]:
    """A training step of a handdiff module on ``inputs``: its ``losses`` (bf16 autocast on
    CUDA), backward and an AdamW update (``adamw``: e.g. ``fused=True``)."""
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5, **adamw)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = module.losses(inputs, train=True)["loss"]
        optimise(loss, optimizer)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="the fast path: compile + channels-last"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random components (a smoke run)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = {"compile": args.compile, "channels_last": args.compile}
    with tempfile.TemporaryDirectory() as folder:
        components = benchmark_components(folder, args.tiny)
        checkpointing = args.gradient_checkpointing
        model = HandGenerator(components=components, gradient_checkpointing=checkpointing, **fast)
        controlnet = PoseConditionedDiffusion(
            components=components, conditioning="controlnet", train_unet=False,
            gradient_checkpointing=checkpointing, **fast,
        )  # fmt: skip
    bf16 = device == "cuda"
    for module in (model, controlnet):
        module.to(device)
        module.configure_model()
        frozen = [module.vae, module.text_encoder] + ([module.unet] if module is controlnet else [])
        for part in frozen if bf16 else []:
            part.to(torch.bfloat16)
        module.train()
    fused = {"fused": True} if device == "cuda" else {}
    b, r = args.batch_size, args.resolution
    batch = {
        "image": torch.rand(b, 3, r, r, device=device) * 2 - 1,
        "pose_image": torch.rand(b, 3, r, r, device=device),
        "mask": (torch.rand(b, 1, r, r, device=device) > 0.5).float(),
        "caption": ["a photo of a hand showing a peace sign"] * b,
    }
    # what a latent cache hands the step instead of pixels (datamodules/latent_cache.py)
    cached = {**model.latent_cache_tensors(batch), "caption": batch["caption"]}
    controlnet_cached = {**controlnet.latent_cache_tensors(batch), "caption": batch["caption"]}

    ids = model.tokenizer(
        batch["caption"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    scheduler = model.noise_scheduler
    vae, text_encoder = model.vae, model.text_encoder

    def noised() -> tuple[torch.Tensor, ...]:
        """The examples' forward process: ``(noisy latents, t, text states, noise)``."""
        with torch.no_grad():
            latents = vae.encode(batch["image"].to(vae.dtype)).latent_dist.sample()
            latents, text = latents.float() * vae.config.scaling_factor, text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device=device)
        return scheduler.add_noise(latents, noise, t), t, text, noise

    # diffusers' examples/text_to_image/train_text_to_image.py step on an unmodified SD UNet
    reference_unet = UNet2DConditionModel.from_config(
        {**dict(model.unet.config), "in_channels": 4, "out_channels": 4}
    ).to(device)
    reference_unet.train()
    if checkpointing:
        reference_unet.enable_gradient_checkpointing()
    reference_optimizer = torch.optim.AdamW(reference_unet.parameters(), lr=1e-5, **fused)

    def text_to_image_step() -> None:
        noisy, t, text, noise = noised()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            pred = reference_unet(noisy, t, text).sample
        optimise(torch.nn.functional.mse_loss(pred.float(), noise), reference_optimizer)

    # diffusers' examples/controlnet/train_controlnet.py step: frozen UNet, trained ControlNet
    reference_controlnet = ControlNetModel.from_unet(controlnet.unet).to(device)
    reference_controlnet.train()
    if checkpointing:
        reference_controlnet.enable_gradient_checkpointing()
    controlnet_optimizer = torch.optim.AdamW(reference_controlnet.parameters(), lr=1e-5, **fused)
    frozen_unet = controlnet.unet

    def train_controlnet_step() -> None:
        noisy, t, text, noise = noised()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            down, mid = reference_controlnet(
                noisy, t, encoder_hidden_states=text, controlnet_cond=batch["pose_image"],
                return_dict=False,
            )  # fmt: skip
            pred = frozen_unet(
                noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample  # fmt: skip
        optimise(torch.nn.functional.mse_loss(pred.float(), noise), controlnet_optimizer)

    steps = {
        "hand generator": module_step(model, batch, device, **fused),
        "hand generator, cached latents": module_step(model, cached, device, **fused),
        "diffusers train_text_to_image.py": text_to_image_step,
        "ControlNet baseline": module_step(controlnet, batch, device, **fused),
        "ControlNet baseline, cached latents": module_step(
            controlnet, controlnet_cached, device, **fused
        ),
        "diffusers train_controlnet.py": train_controlnet_step,
    }
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = []
    for label, step in steps.items():
        seconds, flops, memory = timed(step, args.steps, device)
        rows.append({
            "step": label, "device": name, "batch_size": b, "resolution": r,
            "gradient_checkpointing": checkpointing, "compile": args.compile,
            "seconds_per_step": round(seconds, 4), "images_per_second": round(b / seconds, 2),
            "tflop_per_step": round(flops / 1e12, 3), "gflop_per_step": round(flops / 1e9, 3),
            "mfu": round(flops / seconds / (peak_tflops * 1e12), 3) if peak_tflops else None,
            "step_peak_gib": round(memory, 1) if memory is not None else None,
        })  # fmt: skip
        emit(rows[-1])
    columns = {"step": "step", "images/s": "images_per_second", "TFLOP/step": "tflop_per_step",
               "MFU": "mfu", "step peak GiB": "step_peak_gib"}  # fmt: skip
    print("\n" + markdown(rows, columns))
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
