"""Stable Diffusion components: loaded with ``from_pretrained``, or built tiny and random.

Both paths return the same classes (``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel``, ``CLIPTokenizer``, ``DDPMScheduler``), so every method, test and the demo
run the code a paper-scale run runs; only the sizes differ.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightning_modules.lora import load_lora
from lightning_modules.token_embeddings import load_embeddings


@dataclass
class ComponentsConfig:
    """Where the SD components come from.

    ``pretrained``: a diffusers-format folder or hub id (SD 1.5: ``runwayml/stable-diffusion-v1-5``
    layout with ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``). ``unet``: optional folder
    of a UNet trained by handdiff (``make export``), replacing the pretrained one. ``tiny``:
    build small random components of the same architecture instead (tests, demo, CI).
    ``lora``: a diffusers-format LoRA (``make train-lora`` + ``make export``, or any SD 1.5
    LoRA) fused into the UNet and text encoder at ``lora_scale``; ``textual_inversion``:
    learned embeddings (``learned_embeds.safetensors``) whose tokens prompts may then use.
    """

    pretrained: str | None = None
    unet: str | None = None
    revision: str | None = None
    variant: str | None = None
    tiny: bool = False
    tiny_seed: int = 0
    lora: str | None = None
    lora_scale: float = 1.0
    textual_inversion: list[str] | None = None


@dataclass
class DiffusionComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler


# SD 1.x training schedule (its scheduler/scheduler_config.json).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="epsilon",
    steps_offset=1,
)


HUB_PROBE_SECONDS = 5


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """SD's CLIP BPE tokenizer built from the vocabulary open_clip bundles (works offline).

    Gives the same ids as ``openai/clip-vit-large-patch14``'s tokenizer (start 49406, end 49407).
    """
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    # open_clip names the special tokens differently; SD's tokenizer files use these names.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): i for token, i in simple.encoder.items()}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    assert tokenizer.vocab_size == 49408, tokenizer.vocab_size
    return tokenizer


def build_tiny_components(seed: int = 0) -> DiffusionComponents:
    """Random SD-architecture components small enough for a CPU: 64 px images, 8x8 latents.

    The VAE keeps SD's four resolution levels (x8 downsampling) and 4 latent channels; the
    UNet has two levels with cross-attention; the text encoder is a 2-layer CLIP with SD's
    vocabulary. Seeded, so a rebuild gives identical frozen weights (checkpoints omit them).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    return DiffusionComponents(
        unet, vae, text_encoder, clip_tokenizer(), DDPMScheduler(**SD_SCHEDULER)
    )


def resolve_pretrained(path: str, what: str, revision: str | None = None) -> str:
    """A local folder as given; a hub id (``org/name``) as its local snapshot when it is in
    the cache, so loading it needs no network; else the id, when the hub answers within
    seconds. Raises one clear line otherwise: without it, ``from_pretrained`` retries an
    unreachable hub for minutes and then fails on an empty tokenizer."""
    from huggingface_hub import constants, is_offline_mode, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    parts = path.split("/")
    if path.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise FileNotFoundError(f"{what}={path!r}: no such folder (nor a hub id 'org/name')")
    try:
        return snapshot_download(path, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if is_offline_mode():
        raise FileNotFoundError(
            f"{what}={path!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "pass a local folder, or download it on a machine with network"
        )
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except urllib.error.HTTPError:
        pass  # the hub answered
    except OSError as exc:
        raise FileNotFoundError(
            f"{what}={path!r}: not in the local Hugging Face cache and the hub "
            f"({constants.ENDPOINT}) is unreachable ({exc}); set HF_HUB_OFFLINE=1 to fail fast, "
            "or pass a local folder"
        ) from None
    return path


def load_components(config: ComponentsConfig) -> DiffusionComponents:
    """Load (or build, with ``tiny``) the components described by ``config``."""
    if config.tiny:
        components = build_tiny_components(config.tiny_seed)
    else:
        if not config.pretrained:
            raise ValueError("components.pretrained is required unless components.tiny is true")
        pretrained = resolve_pretrained(config.pretrained, "components.pretrained", config.revision)
        kw = dict(revision=config.revision)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
        # transformers 5 can return an empty tokenizer instead of raising when files are missing.
        if tokenizer.vocab_size < 1000:
            raise FileNotFoundError(
                f"components.pretrained={config.pretrained!r}: tokenizer/ has no vocabulary"
            )
        components = DiffusionComponents(
            unet=UNet2DConditionModel.from_pretrained(
                pretrained, subfolder="unet", variant=config.variant, **kw
            ),
            vae=AutoencoderKL.from_pretrained(
                pretrained, subfolder="vae", variant=config.variant, **kw
            ),
            text_encoder=CLIPTextModel.from_pretrained(
                pretrained, subfolder="text_encoder", variant=config.variant, **kw
            ),
            tokenizer=tokenizer,
            noise_scheduler=DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw),
        )
    if config.unet:
        components.unet = UNet2DConditionModel.from_pretrained(
            resolve_pretrained(config.unet, "components.unet")
        )
    if config.lora:
        load_lora(config.lora, components.unet, components.text_encoder, config.lora_scale)
    for path in config.textual_inversion or []:
        load_embeddings(path, components.tokenizer, components.text_encoder)
    return components
