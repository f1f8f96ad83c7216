"""LoRA adapters (Hu et al. 2021: W = W0 + (alpha / r) * B A, W0 frozen) through peft, as
diffusers' LoRA training examples add them, saved and loaded in diffusers' LoRA format.

The community's hand LoRA recipes (compared in Hayes, Stanford CS236) use two module sets:
``attention`` (the UNet's attention projections ``to_q/to_k/to_v/to_out.0`` and the text
encoder's attention and MLP, r = 32, alpha = 1) and ``attention_conv`` (those plus the UNet's
convolutions: the resnets' ``conv1/conv2/conv_shortcut`` and the down/up-samplers' ``conv``,
at their own rank and alpha, r = 8, alpha = 4).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import fuse_text_encoder_lora
from diffusers.utils import convert_state_dict_to_diffusers, recurse_remove_peft_layers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_CONVS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, what load_lora_weights reads


@dataclass
class LoRASettings:
    """Which modules get adapters and at what rank and scale (``alpha / rank``)."""

    modules: Literal["attention", "attention_conv"] = "attention"
    rank: int = 32
    alpha: float = 1.0
    conv_rank: int = 8  # attention_conv only
    conv_alpha: float = 4.0
    text_encoder: bool = True  # adapters on the text encoder's attention and MLP too
    dropout: float = 0.0


def unet_lora_config(settings: LoRASettings) -> LoraConfig:
    """peft's config for the UNet: attention projections, plus convolutions at their own rank
    and alpha for ``attention_conv`` (peft matches pattern keys as module-name suffixes)."""
    targets = list(UNET_ATTENTION)
    ranks, alphas = {}, {}
    if settings.modules == "attention_conv":
        targets += UNET_CONVS
        ranks = {name: settings.conv_rank for name in UNET_CONVS}
        alphas = {name: settings.conv_alpha for name in UNET_CONVS}
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )


def text_lora_config(settings: LoRASettings) -> LoraConfig:
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian",
        target_modules=list(TEXT_MODULES),
    )


def add_lora(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, settings: LoRASettings
) -> None:
    """Freeze both networks and give them trainable adapters (``add_adapter``, as diffusers'
    ``train_text_to_image_lora.py``); B starts at zero, so the model is unchanged at step 0."""
    unet.requires_grad_(False)
    unet.add_adapter(unet_lora_config(settings))
    if settings.text_encoder:
        text_encoder.requires_grad_(False)
        text_encoder.add_adapter(text_lora_config(settings))


def _config_dict(config: LoraConfig) -> dict:
    """A peft config as JSON-able metadata (what diffusers stores beside the weights so that
    ``alpha != rank`` survives loading)."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def save_lora(
    out_dir: str | os.PathLike,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel | None,
    settings: LoRASettings,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``StableDiffusionPipeline.
    load_lora_weights`` loads (keys ``unet.*`` / ``text_encoder.*`` in diffusers' naming, with
    each adapter's config as metadata)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    text_layers = None
    if text_encoder is not None and settings.text_encoder:
        text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        # transformers 5 flattens CLIPTextModel; the format (and transformers 4, A1111,
        # ComfyUI) names its layers under text_model., which diffusers strips when loading
        text_layers = {
            k if k.startswith("text_model.") else f"text_model.{k}": v
            for k, v in text_layers.items()
        }
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        weight_name=LORA_FILE,
        unet_lora_adapter_metadata=_config_dict(unet_lora_config(settings)),
        text_encoder_lora_adapter_metadata=(
            _config_dict(text_lora_config(settings)) if text_layers else None
        ),
    )
    return out / LORA_FILE


def load_lora(
    path: str | os.PathLike,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scale: float = 1.0,
) -> None:
    """Load a diffusers-format LoRA (a folder holding ``pytorch_lora_weights.safetensors`` or
    the file) and fuse it into the weights at ``scale``, leaving plain networks: any method
    can then train or sample on top of it."""
    path = Path(path)
    folder, weight = (path.parent, path.name) if path.is_file() else (path, LORA_FILE)
    if not (folder / weight).is_file():
        raise FileNotFoundError(f"components.lora={str(path)!r}: no {weight} there")
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(folder), weight_name=weight, return_lora_metadata=True
    )
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    unet.fuse_lora(lora_scale=scale)
    recurse_remove_peft_layers(unet)
    if any(k.startswith("text_encoder.") for k in state):
        StableDiffusionPipeline.load_lora_into_text_encoder(
            state, alphas, text_encoder, prefix="text_encoder", metadata=metadata
        )
        fuse_text_encoder_lora(text_encoder, lora_scale=scale)
        recurse_remove_peft_layers(text_encoder)
    # peft leaves its config behind; a fused model has no adapter
    for net in (unet, text_encoder):
        if hasattr(net, "peft_config"):
            del net.peft_config
        net._hf_peft_config_loaded = False
