"""Pose networks as heatmap functions: images ``[B, 3, H, W]`` in [0, 1] -> per-joint heatmaps
``[B, J, h, w]``, the ``W`` source of HumanSD's heatmap-guided loss (``heatmap.source:
network``).

HumanSD's released code runs mmpose's HigherHRNet-W48 (``higherhrnet_w48_coco_512x512_udp``)
on the decoded noise difference: backbone + keypoint head, the heatmap outputs of every stage
(1/4 and 1/2 of the input) bilinearly resized to the last stage's size and averaged, no flip,
one scale, and the [0, 1] image fed as is (no ImageNet normalisation, although mmpose trained
the network on normalised inputs). :class:`HeatmapNetwork` does that aggregation for any
module; :class:`MMPoseHeatmaps` builds the module from an mmpose config and checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def average_stages(outputs) -> torch.Tensor:
    """A network's heatmap output -> ``[B, J, h, w]``: a tensor as is; the first element of a
    tuple (heatmaps before e.g. associative-embedding tags); a list of per-stage heatmaps
    resized to the last stage's size (bilinear, ``align_corners=True`` as mmpose's
    ``aggregate_stage_flip``) and averaged."""
    if isinstance(outputs, tuple):
        outputs = outputs[0]
    if isinstance(outputs, torch.Tensor):
        return outputs
    size = outputs[-1].shape[-2:]
    joints = outputs[-1].shape[1]
    resized = [
        F.interpolate(o[:, :joints], size=size, mode="bilinear", align_corners=True)
        for o in outputs
    ]
    return torch.stack(resized).mean(0)


class HeatmapNetwork(nn.Module):
    """Wraps ``network`` (any module) so that it returns ``[B, J, h, w]`` heatmaps;
    ``normalize=True`` applies ImageNet mean/std to the input first (the released HumanSD code
    does not: ``False`` reproduces it)."""

    def __init__(self, network: nn.Module, normalize: bool = False):
        super().__init__()
        self.network = network
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            images = (images - self.mean.to(images)) / self.std.to(images)
        return average_stages(self.network(images))


class _MMPoseHeads(nn.Module):
    """An mmpose 1.x model's backbone (+ neck) and head, without its decoding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.head.forward(self.model.extract_feat(images))


class MMPoseHeatmaps(HeatmapNetwork):
    """An mmpose 1.x pose model from a local ``config`` and ``checkpoint`` as a heatmap network
    (HumanSD used HigherHRNet-W48). mmpose's model building needs mmcv compiled with its ops
    (the optional build in ``docs/mmpose.md``); without it, construction says so."""

    def __init__(self, config: str | None, checkpoint: str | None, normalize: bool = False):
        if not config or not checkpoint:
            raise ValueError(
                f"MMPoseHeatmaps needs a local mmpose model config and checkpoint, got "
                f"config={config!r}, checkpoint={checkpoint!r}"
            )
        try:
            from mmpose.apis import init_model
        except (ImportError, ModuleNotFoundError) as exc:
            raise ImportError(
                f"MMPoseHeatmaps needs mmpose's model building, which needs mmcv compiled with "
                f"its ops ({exc}); see docs/mmpose.md for the build"
            ) from exc
        super().__init__(_MMPoseHeads(init_model(config, checkpoint, device="cpu")), normalize)
