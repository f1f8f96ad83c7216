"""Widening a UNet's input or output convolution without changing what it computes."""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn


def _widened(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    new = nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        # Zero everywhere except the original block: new inputs contribute nothing and new
        # outputs start at 0, so a pretrained UNet's prediction is unchanged at step 0.
        new.weight.zero_()
        new.weight[: conv.out_channels, : conv.in_channels] = conv.weight
        if conv.bias is not None:
            new.bias.zero_()
            new.bias[: conv.out_channels] = conv.bias
    return new


def widen_conv_in(unet: UNet2DConditionModel | ControlNetModel, in_channels: int):
    """Give ``conv_in`` ``in_channels`` inputs, the extra ones zero-initialised (in place).

    Works for a UNet or a ControlNet. One already that wide (e.g. a UNet exported by handdiff
    or an SD-inpainting UNet) is left as it is.
    """
    current = unet.conv_in.in_channels
    if current == in_channels:
        return unet
    if current > in_channels:
        raise ValueError(f"UNet conv_in has {current} inputs, cannot narrow to {in_channels}")
    unet.conv_in = _widened(unet.conv_in, in_channels, unet.conv_in.out_channels)
    unet.register_to_config(in_channels=in_channels)
    return unet


def widen_conv_out(unet: UNet2DConditionModel, out_channels: int) -> UNet2DConditionModel:
    """Give ``conv_out`` ``out_channels`` outputs, the extra ones zero-initialised (in place)."""
    current = unet.conv_out.out_channels
    if current == out_channels:
        return unet
    if current > out_channels:
        raise ValueError(f"UNet conv_out has {current} outputs, cannot narrow to {out_channels}")
    unet.conv_out = _widened(unet.conv_out, unet.conv_out.in_channels, out_channels)
    unet.register_to_config(out_channels=out_channels)
    return unet


def narrow_conv_in(net: UNet2DConditionModel | ControlNetModel, in_channels: int):
    """Keep only the first ``in_channels`` inputs of ``conv_in`` (in place): a ControlNet
    built from a 9-channel inpainting UNet that should read the noisy latent alone (the
    layout of a depth ControlNet trained for plain SD) keeps the latent's weights."""
    current = net.conv_in.in_channels
    if current == in_channels:
        return net
    if current < in_channels:
        raise ValueError(f"conv_in has {current} inputs, cannot narrow to {in_channels}")
    conv = net.conv_in
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, :in_channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    net.conv_in = new
    net.register_to_config(in_channels=in_channels)
    return net
