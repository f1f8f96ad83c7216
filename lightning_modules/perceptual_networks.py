"""The networks of the perceptual loss, from local weights or small and random for tests.

LPIPS (Zhang et al. 2018) through the ``lpips`` package: its calibrated linear layers ship
with the package; the VGG16 backbone comes from a local torchvision state dict (the package
would download it). The face network is a ResNet-50 trunk (the reference's VGGFace2 ResNet-50,
8631 identities) whose conv1 and layer1-4 outputs are the face features; its weights come from
a local ``.safetensors`` or a plain state-dict file read with ``weights_only`` (never a pickle
of objects, e.g. the ``.pkl`` the VGGFace2 port distributes: convert it once where you trust it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models import resnet
from torchvision.models import vgg16 as torchvision_vgg16


def read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a tensors-only torch file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}={path!r}: no such file")
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError and others for object pickles
        raise ValueError(
            f"{what}={path!r}: not a tensors-only state dict ({type(exc).__name__}); save it as "
            ".safetensors or with torch.save(model.state_dict())"
        ) from None


def build_lpips(vgg_weights: str | None = None, seed: int = 0) -> nn.Module:
    """Spatial LPIPS (VGG) with the package's linear layers and the VGG16 features from
    ``vgg_weights`` (torchvision's ``vgg16`` state dict); without weights a seeded random VGG
    (tests, the tiny configs)."""
    import lpips

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = lpips.LPIPS(net="vgg", spatial=True, pnet_rand=True, verbose=False)
    if vgg_weights is not None:
        vgg = torchvision_vgg16()
        vgg.load_state_dict(read_state_dict(vgg_weights, "lpips vgg_weights"))
        # lpips' slices hold torchvision's feature modules under their original indices
        for slice_ in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4,
                       model.net.slice5):  # fmt: skip
            for index, module in slice_.named_children():
                module.load_state_dict(vgg.features[int(index)].state_dict())
    return model.requires_grad_(False).eval()


class FaceFeatures(nn.Module):
    """A ResNet trunk returning ``[conv1, layer1, layer2, layer3, layer4]`` feature maps of face
    crops ``[N, 3, S, S]`` in [-1, 1] (conv1 before its batch norm, as the reference). ``tiny``:
    one BasicBlock per stage, random and seeded; otherwise ResNet-50 with ``weights``."""

    def __init__(self, weights: str | None = None, tiny: bool = False, num_classes: int = 8631,
                 seed: int = 0):  # fmt: skip
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if tiny:
                self.net = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
            else:
                self.net = resnet.resnet50(num_classes=num_classes)
        if weights is not None:
            self.net.load_state_dict(read_state_dict(weights, "face weights"))
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        first = n.conv1(x)
        out, h = [first], n.maxpool(n.relu(n.bn1(first)))
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            h = layer(h)
            out.append(h)
        return out
