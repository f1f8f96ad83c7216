"""FID and KID: torchmetrics' implementations with handdiff's conventions.

Both take images ``[N, 3, H, W]`` float in [0, 1] for real and generated sets alike, and a
``feature_extractor`` (any module mapping such images to ``[N, D]``). Without one they use the
standard 2048-d pool features of torch-fidelity's Inception (``pt_inception-2015-12-05``),
loaded from a local file: nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from metrics.dist_sync import EmptyRankSafeSync

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
INCEPTION_ENV = "HANDDIFF_INCEPTION_WEIGHTS"


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights: ``path``, else ``$HANDDIFF_INCEPTION_WEIGHTS``, else torch's hub
    cache (where torch-fidelity downloads them). A clear error says where to put them."""
    candidates = [
        path,
        os.environ.get(INCEPTION_ENV),
        Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE,
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"FID/KID Inception weights not found (looked at {[str(c) for c in candidates if c]}). "
        f"Download {INCEPTION_URL} on a machine with internet and pass its path as "
        f"feature_extractor_weights_path=..., set ${INCEPTION_ENV}, or copy it to "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}/."
    )


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 pool features ``[N, 2048]`` of images in [0, 1].

    Images are quantised to uint8 first, as torch-fidelity and torchmetrics do for real and
    generated images alike, then resized to 299 px inside the network (``antialias`` as in
    torchmetrics >= 1.8; torch-fidelity itself resizes without antialiasing, which changes
    scores of 512 px images — every results file records the setting).
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, antialias: bool = True):
        super().__init__()
        self.antialias = antialias
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=str(find_inception_weights(weights_path)),
            antialias=antialias,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).to(torch.uint8))


class _Float64Features(nn.Module):
    """Features in float64, so that FID's and KID's sums and kernels are exact to ~1e-12."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        if hasattr(extractor, "num_features"):
            self.num_features = extractor.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images).double()


def _extractor(feature_extractor, weights_path, antialias) -> nn.Module:
    if feature_extractor is None:
        feature_extractor = InceptionFeatures(weights_path, antialias)
    return _Float64Features(feature_extractor)


class FID(FrechetInceptionDistance):
    """Fréchet distance between Gaussians fitted to real and generated features (Heusel et al.
    2017): ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``.

    ``update(images, real)``; ``compute()`` a scalar tensor. States are feature sums and
    outer-product sums (memory independent of N; summed across DDP ranks); the matrix square
    root is taken once, in ``compute``, through the eigenvalues of ``S_r S_g``.
    """

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        feature_extractor_weights_path: str | None = None,
        antialias: bool = True,
        reset_real_features: bool = True,
        **kwargs,
    ):
        super().__init__(
            feature=_extractor(feature_extractor, feature_extractor_weights_path, antialias),
            reset_real_features=reset_real_features,
            normalize=True,
            **kwargs,
        )
        self.antialias = antialias


class KID(EmptyRankSafeSync, KernelInceptionDistance):
    """Kernel Inception distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic
    polynomial kernel ``(x.y / d + 1)^3``, averaged over ``subsets`` random subsets of
    ``subset_size``; ``compute()`` returns ``(mean, std)``. Keeps the features (the metric
    needs them all), gathered across DDP ranks.

    The subsets are drawn with a generator seeded by ``seed`` from the features in a canonical
    order (not the order ranks delivered them), so the score does not depend on the number of
    processes or on the global RNG.
    """

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        subsets: int = 100,
        subset_size: int = 1000,
        feature_extractor_weights_path: str | None = None,
        antialias: bool = True,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(
            feature=_extractor(feature_extractor, feature_extractor_weights_path, antialias),
            subsets=subsets,
            subset_size=subset_size,
            normalize=True,
            **kwargs,
        )
        self.antialias = antialias
        self.seed = seed

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        for name in ("real_features", "fake_features"):
            features = dim_zero_cat(getattr(self, name)).double()
            # a fixed projection gives every feature vector a sort key independent of order
            key = features @ torch.linspace(
                1.0, 2.0, features.shape[1], dtype=torch.float64, device=features.device
            )
            setattr(self, name, [features[torch.argsort(key)]])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return super().compute()
