"""The fast-path switches (channels-last, foreach EMA) change the memory layout and the kernels,
not the numbers: checked on CPU against the plain path. Compilation and fused AdamW run in the
CUDA test of tests/test_training.py."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.pose_conditioned import PoseConditionedDiffusion


def batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1,
        "pose_image": torch.rand(2, 3, 64, 64, generator=gen),
        "caption": ["a person", "a person waving"],
    }


def test_channels_last_applies_to_the_unet_and_controlnet_and_keeps_the_loss():
    losses = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = PoseConditionedDiffusion(
            {"tiny": True}, conditioning="controlnet", channels_last=channels_last
        )
        model.configure_model()
        networks = model.trained_networks()
        assert len(networks) == 2 and networks[1] is model.conditioning.controlnet
        weight = model.conditioning.controlnet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == (
            channels_last
        )
        terms = model.losses(batch(), train=True, generator=torch.Generator().manual_seed(1))
        losses.append(float(terms["loss"]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_foreach_ema_equals_the_per_tensor_update():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    emas = [EMAModel(params, decay=0.9, foreach=foreach) for foreach in (False, True)]
    for step in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.1 + step)
        for ema in emas:
            ema.step(params)
    for a, b, p in zip(emas[0].shadow_params, emas[1].shadow_params, params, strict=True):
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, p, atol=0.1)
