"""FID and KID: torchmetrics' implementations with handdiff's conventions.

Both take images ``[N, 3, H, W]`` float in [0, 1] for real and generated sets alike, and a
``feature_extractor`` (any module mapping such images to ``[N, D]``). Without one they use the
standard 2048-d pool features of torch-fidelity's Inception (``pt_inception-2015-12-05``),
loaded from a local file: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3, _compute_fid
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
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
            setattr(self, name, [_canonical(dim_zero_cat(getattr(self, name)).double())])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return super().compute()


class CategoryFIDKID(EmptyRankSafeSync, Metric):
    """FID and KID per category, and their mean over categories: HumanSD reports FID and KID on
    Human-Art per scene and averages them (its Table 1), which differs from the pooled score
    over all images.

    ``update(features, real, categories)`` with features ``[N, D]`` (the Evaluator passes the
    FID extractor's: one more pass of the feature network when this metric is on) and one
    category name per image ("" = none, left out).
    ``compute()`` returns ``{"fid": {name: value}, "kid": {name: value}, "fid_category_mean",
    "kid_category_mean"}`` over the categories with at least 2 real and 2 generated images;
    KID per category uses ``min(subset_size, n_real, n_fake)`` and the seeded, canonical-order
    subsets of :class:`KID`. Names cross DDP ranks as Python objects, features as tensors.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, subsets: int = 100, subset_size: int = 1000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        for side in ("real", "fake"):
            self.add_state(f"{side}_features", default=[], dist_reduce_fx="cat")
            self.add_state(f"{side}_categories", default=[], dist_reduce_fx="cat")
        self._names: dict[int, str] = {}

    def _category_id(self, name: str) -> int:
        # a stable 62-bit id, the same on every rank and run
        category_id = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") >> 2
        self._names[category_id] = name
        return category_id

    def update(self, features: torch.Tensor, real: bool, categories: list[str]) -> None:
        side = "real" if real else "fake"
        ids = [self._category_id(c) if c else -1 for c in categories]
        getattr(self, f"{side}_features").append(features.double())
        getattr(self, f"{side}_categories").append(
            torch.tensor(ids, dtype=torch.long, device=features.device)
        )

    def _all_names(self) -> dict[int, str]:
        names = dict(self._names)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, names)
            for part in gathered:
                names.update(part)
        return names

    def _kid(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        size = min(self.subset_size, len(real), len(fake))
        scores = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for _ in range(self.subsets):
                f_real = real[torch.randperm(len(real))[:size]]
                f_fake = fake[torch.randperm(len(fake))[:size]]
                scores.append(poly_mmd(f_real, f_fake))
        return float(torch.stack(scores).mean())

    def compute(self) -> dict:
        names = self._all_names()
        data = {}
        for side in ("real", "fake"):
            state = getattr(self, f"{side}_features")
            # a list before sync (or without DDP), one gathered tensor after
            if not isinstance(state, list) or state:
                features = dim_zero_cat(state).double()
                ids = dim_zero_cat(getattr(self, f"{side}_categories"))
            else:  # no images of this side at all
                features, ids = torch.zeros(0, 1, dtype=torch.float64), torch.zeros(0).long()
            data[side] = (features, ids)
        fid, kid = {}, {}
        for category_id, name in sorted(names.items(), key=lambda item: item[1]):
            real, fake = (
                _canonical(data[side][0][data[side][1] == category_id]) for side in ("real", "fake")
            )
            if len(real) < 2 or len(fake) < 2:
                continue
            fid[name] = float(_compute_fid(*_mean_cov(fake), *_mean_cov(real)))
            kid[name] = self._kid(real, fake)
        out: dict = {"fid": fid, "kid": kid}
        if fid:
            out["fid_category_mean"] = sum(fid.values()) / len(fid)
            out["kid_category_mean"] = sum(kid.values()) / len(kid)
        return out


def _canonical(features: torch.Tensor) -> torch.Tensor:
    """Features in an order independent of how ranks delivered them: a fixed projection gives
    every feature vector a sort key."""
    key = features @ torch.linspace(
        1.0, 2.0, features.shape[1], dtype=torch.float64, device=features.device
    )
    return features[torch.argsort(key)]


def _mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance, as torchmetrics' FID from its sums."""
    n = features.shape[0]
    mean = features.mean(0)
    centred = features - mean
    return mean, centred.T @ centred / (n - 1)
