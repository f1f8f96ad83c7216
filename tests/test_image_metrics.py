"""FID, KID and CLIPSim against direct formulas (scipy / numpy), with small feature models."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch

from metrics.clip_sim import CLIPSim
from metrics.fid_kid import FID, KID, CategoryFIDKID, InceptionFeatures, find_inception_weights
from metrics.hand_fid import HandFIDKID, crop_hands, hand_boxes
from metrics.random_nets import tiny_clip


class PoolFeatures(torch.nn.Module):
    """A fixed small feature map: 4x4 average pooling of the image, [N, 48]."""

    num_features = 48

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)


def _images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 0.8 + shift).clamp(0, 1)


def _fid_reference(real: np.ndarray, fake: np.ndarray) -> float:
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_sqrtm_formula():
    real, fake = _images(200, 0), _images(150, 1, shift=0.1)
    metric = FID(feature_extractor=PoolFeatures())
    for chunk in real.split(64):
        metric.update(chunk, real=True)
    for chunk in fake.split(64):
        metric.update(chunk, real=False)
    features = PoolFeatures()
    reference = _fid_reference(features(real).double().numpy(), features(fake).double().numpy())
    assert metric.compute().item() == pytest.approx(reference, rel=1e-12)
    assert reference > 0.01


def test_fid_of_a_set_with_itself_is_zero():
    images = _images(120, 3)
    metric = FID(feature_extractor=PoolFeatures())
    metric.update(images, real=True)
    metric.update(images, real=False)
    assert abs(metric.compute().item()) < 1e-9


def _kid_reference(real: np.ndarray, fake: np.ndarray) -> float:
    d = real.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(real)
    kxx, kyy, kxy = k(real, real), k(fake, fake), k(real, fake)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def test_kid_matches_the_unbiased_mmd_formula():
    real, fake = _images(60, 4), _images(60, 5, shift=0.1)
    metric = KID(feature_extractor=PoolFeatures(), subsets=1, subset_size=60)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    mean, std = metric.compute()
    features = PoolFeatures()
    reference = _kid_reference(features(real).double().numpy(), features(fake).double().numpy())
    assert mean.item() == pytest.approx(reference, rel=1e-12)
    assert std.item() == 0


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("HANDDIFF_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05.*checkpoints"):
        FID()


def test_default_inception_path_loads_a_weights_file(tmp_path, monkeypatch):
    # Random weights of the right architecture exercise the default code path end to end;
    # the real file is torch-fidelity's, which users bring.
    from torchmetrics.image.fid import NoTrainInceptionV3

    with monkeypatch.context() as m:
        m.setattr(torch, "load", lambda *args, **kwargs: {})
        m.setattr(NoTrainInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        random_net = NoTrainInceptionV3("inception-v3-compat", ["2048"], "unused")
    path = tmp_path / "inception.pth"
    torch.save(random_net.state_dict(), path)
    monkeypatch.setenv("HANDDIFF_INCEPTION_WEIGHTS", str(path))
    assert find_inception_weights() == path
    features = InceptionFeatures()
    torch.testing.assert_close(features.net.state_dict(), random_net.state_dict())
    images = torch.rand(2, 3, 64, 64)
    out = features(images)
    assert out.shape == (2, 2048)
    # same preprocessing for every image: uint8 quantisation, then the network
    torch.testing.assert_close(out, random_net((images * 255).to(torch.uint8)))
    metric = FID()
    metric.update(images, real=True)
    metric.update(images.flip(-1), real=False)
    assert torch.isfinite(metric.compute())


def test_clipsim_matches_the_direct_formula():
    model = tiny_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    metric = CLIPSim(model=model, tokenizer=tokenizer)
    images = _images(6, 7)
    captions = [f"a person showing {i} fingers" for i in range(6)]
    metric.update(images[:4], captions[:4])
    metric.update(images[4:], captions[4:])
    # direct: open_clip-style preprocessing, normalised embeddings, 100 * max(cos, 0), mean
    pixels = torch.nn.functional.interpolate(images, size=32, mode="bicubic", antialias=True)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((pixels.clamp(0, 1) - mean) / std)
        txt = model.encode_text(tokenizer(captions))
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    expected = (100 * cos.clamp(min=0)).mean()
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-5)


def test_category_fid_kid_is_the_per_category_score_and_its_mean():
    """Two scenes with different generated shifts: each category's FID equals the scipy
    reference on that category's features alone, its KID the KID metric on that category
    alone, and the mean is over categories (not the pooled score)."""
    features = PoolFeatures()
    real = {"dance": _images(60, 0), "cartoon": _images(50, 1)}
    fake = {"dance": _images(40, 2, shift=0.05), "cartoon": _images(45, 3, shift=0.3)}
    metric = CategoryFIDKID(subsets=5, subset_size=1000, seed=0)
    for name, images in real.items():
        metric.update(features(images), True, [name] * len(images))
    for name, images in fake.items():
        metric.update(features(images), False, [name] * len(images))
    metric.update(features(_images(5, 9)), False, [""] * 5)  # no category: left out
    out = metric.compute()
    assert set(out["fid"]) == {"dance", "cartoon"}
    for name in real:
        reference = _fid_reference(
            features(real[name]).double().numpy(), features(fake[name]).double().numpy()
        )
        assert out["fid"][name] == pytest.approx(reference, rel=1e-9)
        kid = KID(feature_extractor=PoolFeatures(), subsets=5, subset_size=40, seed=0)
        kid.update(real[name], real=True)
        kid.update(fake[name], real=False)
        kid.subset_size = min(len(real[name]), len(fake[name]))
        assert out["kid"][name] == pytest.approx(float(kid.compute()[0]), rel=1e-9)
    assert out["fid"]["cartoon"] > 2 * out["fid"]["dance"]
    assert out["fid_category_mean"] == pytest.approx(sum(out["fid"].values()) / 2)
    assert out["kid_category_mean"] == pytest.approx(sum(out["kid"].values()) / 2)


# --- FID-H / KID-H ---------------------------------------------------------------------------


def _square_hand(x0: float, y0: float, w: float, h: float) -> torch.Tensor:
    """21 labelled keypoints spanning the box (x0, y0, w, h)."""
    t = torch.linspace(0, 1, 21)
    return torch.stack([x0 + w * t, y0 + h * t.flip(0), torch.full((21,), 2.0)], -1)


def test_hand_crop_is_the_padded_square_around_the_keypoints():
    hand = _square_hand(150, 125, 100, 50)  # box centre (200, 150), longer side 100
    (box,) = hand_boxes(hand[None], padding=0.25)
    np.testing.assert_allclose(box.numpy(), [125, 75, 275, 225])  # side 150
    small = _square_hand(10, 10, 12, 8)  # 12 px: under min_size
    few = hand.clone()
    few[4:, 2] = 0  # 4 labelled keypoints
    assert len(hand_boxes(torch.stack([small, few]))) == 0


def test_hand_crops_sample_the_box_and_zero_outside_the_image():
    image = torch.zeros(1, 3, 300, 400)
    image[:, 0, 75:150, 125:275] = 1.0  # red fills the top half of the hand's crop box
    (crop,) = crop_hands(image, [_square_hand(150, 125, 100, 50)[None]], size=30)
    assert crop[0, :14].mean() > 0.95 and crop[0, 16:].max() < 0.05  # top half red, rest not
    edge = crop_hands(image, [_square_hand(-40, -40, 100, 100)[None]], size=30)  # off the corner
    assert edge.shape == (1, 3, 30, 30) and edge[0, :, :10, :10].abs().max() == 0


def test_hand_fid_is_fid_of_the_crops():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(6, 3, 64, 64, generator=g), torch.rand(6, 3, 64, 64, generator=g) * 0.5
    hands = [_square_hand(8, 8, 30, 30)[None] for _ in range(6)]
    metric = HandFIDKID(PoolFeatures(), subsets=3, subset_size=4, min_size=16)
    metric.update(real, hands, real=True)
    metric.update(fake, hands, real=False)
    out = metric.compute()
    direct = FID(feature_extractor=PoolFeatures())
    direct.update(crop_hands(real, hands), real=True)
    direct.update(crop_hands(fake, hands), real=False)
    assert out["fid_h"].item() == pytest.approx(direct.compute().item(), rel=1e-9)
    assert out["n_hand_crops_real"] == 6 and out["n_hand_crops_generated"] == 6
    assert out["kid_h_mean"] > 0 and out["fid_h"] > 0
    metric.reset()
    metric.update(real, [torch.zeros(0, 21, 3)] * 6, real=True)  # no hand anywhere
    assert torch.isnan(metric.compute()["fid_h"])
