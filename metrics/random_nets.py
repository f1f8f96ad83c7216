"""Small, seeded, randomly initialised networks for the tiny evaluation config and tests.

They exercise the evaluation code path on a CPU without weights. Their scores are *not*
comparable with the published FID/KID/CLIPSIM numbers, which need the real Inception and CLIP
weights (the paper-scale configs load those).
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn


class RandomConvFeatures(nn.Module):
    """A fixed random conv net: images ``[N, 3, H, W]`` in [0, 1] -> features ``[N, D]``."""

    def __init__(self, num_features: int = 64, seed: int = 0):
        super().__init__()
        self.num_features = num_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 5, stride=2), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                nn.Conv2d(32, num_features, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )  # fmt: skip
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(nn.functional.interpolate(images, size=64, mode="bilinear", antialias=True))


class RandomHeatmapNet(nn.Module):
    """A fixed random conv net standing in for a pose network in tiny runs (HumanSD's
    ``heatmap.source: network``): images ``[N, 3, H, W]`` in [0, 1] -> heatmaps
    ``[N, joints, H/4, W/4]`` in [0, 1]."""

    def __init__(self, joints: int = 17, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, joints, 3, stride=2, padding=1), nn.Sigmoid(),
            )  # fmt: skip
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def tiny_clip(seed: int = 0) -> CLIP:
    """An open_clip CLIP with ViT-B/16's tokenizer vocabulary, 32 px images, 16-d embeddings."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(
            embed_dim=16,
            vision_cfg=CLIPVisionCfg(
                layers=1, width=32, head_width=16, patch_size=8, image_size=32
            ),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        ).eval()
