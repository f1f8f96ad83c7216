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


def test_the_module_ema_updates_with_foreach_ops_as_the_per_tensor_update():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = PoseConditionedDiffusion({"tiny": True}, conditioning="none", ema={"enabled": True})
    model._make_ema()
    assert model.ema.foreach is True
    params = model.trainable_parameters()
    reference = EMAModel(params, decay=model.ema_config.decay, foreach=False)
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.1)
        model.ema.step(params)
        reference.step(params)
    for a, b in zip(model.ema.shadow_params, reference.shadow_params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # the average lags the weights: the comparison above is not of two copies of them
    assert any(
        not torch.allclose(a, p) for a, p in zip(model.ema.shadow_params, params, strict=True)
    )
