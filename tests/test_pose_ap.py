"""PoseAP against xtcocotools' COCOeval (an independent implementation), CAP against a direct
implementation of the intended formula, PCE by counting."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from xtcocotools.coco import COCO as XCOCO
from xtcocotools.cocoeval import COCOeval as XCOCOeval

from metrics.keypoint_sigmas import SIGMAS
from metrics.pose_ap import PoseAP, weighted_cosine_similarity


def random_scene(rng: np.random.Generator, n_images: int, k: int):
    """Images with 0-4 people; detections that are jittered copies (some missing, some extra,
    some on empty images), occluded and unlabelled keypoints, random scores."""
    preds, targets = [], []
    for _ in range(n_images):
        people = []
        for _ in range(rng.integers(0, 5)):
            centre = rng.uniform(60, 440, 2)
            scale = rng.uniform(10, 120)
            kp = np.zeros((k, 3))
            kp[:, :2] = centre + rng.normal(0, scale, (k, 2))
            kp[:, 2] = rng.choice([0, 1, 2], k, p=[0.2, 0.2, 0.6])
            kp[kp[:, 2] == 0, :2] = 0
            people.append(kp)
        dets, scores = [], []
        for kp in people:
            if rng.random() < 0.25:
                continue  # missed person
            det = kp.copy()
            det[:, :2] += rng.normal(0, rng.uniform(0.5, 30), (k, 2))
            det[:, 2] = rng.uniform(0, 1, k)
            dets.append(det)
            scores.append(rng.uniform(0, 1))
        for _ in range(rng.integers(0, 3) if rng.random() < 0.4 else 0):
            det = np.zeros((k, 3))
            det[:, :2] = rng.uniform(0, 500, 2) + rng.normal(0, 40, (k, 2))
            det[:, 2] = rng.uniform(0, 1, k)
            dets.append(det)
            scores.append(rng.uniform(0, 1))
        preds.append(
            {
                "keypoints": torch.tensor(np.array(dets).reshape(-1, k, 3)),
                "scores": torch.tensor(scores),
            }
        )
        targets.append({"keypoints": torch.tensor(np.array(people).reshape(-1, k, 3))})
    return preds, targets


def xtcocotools_stats(preds, targets, sigmas, humansd_code: bool = False) -> np.ndarray:
    """The reference: xtcocotools COCOeval on the same data, HumanSD's protocol; with
    ``humansd_code`` the ground-truth box as HumanSD's pose_metrics.py builds it (unlabelled
    rows stored as (-1, -1, 0), min/max over all rows); a target's "areas" override both."""
    images, anns, dets = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        images.append({"id": i, "width": 500, "height": 500})
        areas = t.get("areas", torch.zeros(len(t["keypoints"]))).numpy()
        for kp, given_area in zip(t["keypoints"].numpy(), areas, strict=True):
            vis = kp[:, 2] > 0
            if not vis.any():
                continue
            if humansd_code:
                stored = kp.copy()
                stored[~vis] = [-1, -1, 0]
                x0, y0 = min(stored[:, 0]), min(stored[:, 1])
                x1, y1 = max(stored[:, 0]), max(stored[:, 1])
            else:
                x0, y0 = kp[vis, :2].min(0)
                x1, y1 = kp[vis, :2].max(0)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "iscrowd": 0,
                    "keypoints": kp.reshape(-1).tolist(),
                    "num_keypoints": int(vis.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": given_area if given_area > 0 else (x1 - x0) * (y1 - y0),
                }
            )
        for kp, s in zip(p["keypoints"].numpy(), p["scores"].numpy(), strict=True):
            dets.append(
                {
                    "image_id": i,
                    "category_id": 1,
                    "keypoints": kp.reshape(-1).tolist(),
                    "score": float(s),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = XCOCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": 1, "name": "person"}],
        }
        gt.createIndex()
        dt = gt.loadRes(dets)
        evaluator = XCOCOeval(gt, dt, "keypoints", sigmas=sigmas, use_area=True)
        evaluator.params.useSegm = None
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:5]


@pytest.mark.parametrize("kind", ["body", "hand"])
@pytest.mark.parametrize("seed", range(4))
def test_ap_equals_xtcocotools_cocoeval(kind, seed):
    k = len(SIGMAS[kind])
    preds, targets = random_scene(np.random.default_rng(seed), 30, k)
    metric = PoseAP(kind=kind)
    # several updates, as an evaluation loop would call it
    for start in range(0, 30, 7):
        metric.update(preds[start : start + 7], targets[start : start + 7])
    result = metric.compute()
    reference = xtcocotools_stats(preds, targets, SIGMAS[kind])
    ours = [result[n].item() for n in ("ap", "ap50", "ap75", "ap_m", "ap_l")]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9)
    assert 0 < ours[0] < 1  # a scene that exercises matching, not a trivial 0 or 1


@pytest.mark.parametrize("seed", range(2))
def test_humansd_code_area_equals_their_box_over_all_rows(seed):
    preds, targets = random_scene(np.random.default_rng(seed), 30, 17)
    metric = PoseAP(kind="body", gt_area="humansd_code")
    metric.update(preds, targets)
    ours = [metric.compute()[n].item() for n in ("ap", "ap50", "ap75", "ap_m", "ap_l")]
    reference = xtcocotools_stats(preds, targets, SIGMAS["body"], humansd_code=True)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9)
    labelled = xtcocotools_stats(preds, targets, SIGMAS["body"])
    assert ours[0] > labelled[0]  # larger boxes, larger OKS scales, higher AP


def test_given_areas_set_the_oks_scale():
    """Hands scored with their person's area (as COCO-WholeBody): the same detections score
    higher than with the hand's own small box, and equal xtcocotools given those areas."""
    preds, targets = random_scene(np.random.default_rng(5), 30, 21)
    for t in targets:
        t["areas"] = torch.full((len(t["keypoints"]),), 300.0**2)
    metric = PoseAP(kind="hand")
    metric.update(preds, targets)
    ours = [metric.compute()[n].item() for n in ("ap", "ap50", "ap75", "ap_m", "ap_l")]
    np.testing.assert_allclose(
        ours, xtcocotools_stats(preds, targets, SIGMAS["hand"]), rtol=0, atol=1e-9
    )
    own_box = xtcocotools_stats(
        preds, [{"keypoints": t["keypoints"]} for t in targets], SIGMAS["hand"]
    )
    assert ours[0] > own_box[0]


def test_pce_counts_people_per_image():
    k = 17
    person = torch.zeros(1, k, 3)
    person[0, :, :2] = torch.rand(k, 2) * 100
    person[0, :, 2] = 2
    two = torch.cat([person, person + torch.tensor([50.0, 50.0, 0.0])])
    metric = PoseAP()
    metric.update(
        [
            {"keypoints": two, "scores": torch.ones(2)},  # 1 given, 2 detected -> 1
            {"keypoints": torch.zeros(0, k, 3), "scores": torch.zeros(0)},  # 2 given, 0 -> 2
            {"keypoints": torch.zeros(0, k, 3), "scores": torch.zeros(0)},
        ],  # empty, empty -> 0
        [{"keypoints": person}, {"keypoints": two}, {"keypoints": torch.zeros(0, k, 3)}],
    )
    assert metric.compute()["pce"].item() == pytest.approx(1.0)


def test_no_detections_give_zero_ap():
    k = 17
    person = torch.rand(1, k, 3) * 100
    person[..., 2] = 2
    metric = PoseAP()
    metric.update(
        [{"keypoints": torch.zeros(0, k, 3), "scores": torch.zeros(0)}], [{"keypoints": person}]
    )
    result = metric.compute()
    assert result["ap"].item() == 0 and result["cap"].item() == 0 and result["pce"] == 1


def _direct_cosine(det, gt, sigmas):
    """The intended formula written out independently: per-axis min-max + L2 normalisation of
    sigma-scaled coordinates over labelled keypoints, cosine of the stacked vectors."""
    m = gt[:, 2] > 0

    def prep(a):
        a = a[m] / sigmas[m]
        a = (a - a.min()) / (a.max() - a.min())
        return a / np.sqrt((a**2).sum())

    g = np.concatenate([prep(gt[:, 0]), prep(gt[:, 1])])
    d = np.concatenate([prep(det[:, 0]), prep(det[:, 1])])
    return float(g @ d / (np.linalg.norm(g) * np.linalg.norm(d)))


def test_weighted_cosine_similarity_hand_checked_cases():
    sigmas = np.array([0.1, 0.2, 0.1, 0.4])
    gt = np.array([[0, 0, 2], [10, 0, 2], [10, 10, 2], [0, 10, 2.0]])
    # scaling is invariant; a shift is not, because coordinates are divided by the sigmas
    # before the min-max normalisation (as in HumanSD's code)
    assert weighted_cosine_similarity(gt * [3, 3, 1], gt, sigmas) == pytest.approx(1)
    shifted = weighted_cosine_similarity(gt + np.array([7, -2, 0]), gt, sigmas)
    assert shifted < 1 - 1e-3
    uniform = np.full(4, 0.1)
    assert weighted_cosine_similarity(gt + np.array([7, -2, 0]), gt, uniform) == pytest.approx(1)
    # x mirrored, y kept (uniform sigmas): per-axis cosines 0 and 1 -> 0.5
    mirrored = gt.copy()
    mirrored[:, 0] = 10 - gt[:, 0]
    assert weighted_cosine_similarity(mirrored, gt, uniform) == pytest.approx(0.5)
    # only labelled ground-truth keypoints count
    hidden = gt.copy()
    hidden[3, 2] = 0
    moved = gt.copy()
    moved[3, :2] = [500, -300]
    assert weighted_cosine_similarity(moved, hidden, sigmas) == pytest.approx(1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = np.concatenate([rng.uniform(0, 100, (6, 2)), np.full((6, 1), 2)], 1)
        d = np.concatenate([rng.uniform(0, 100, (6, 2)), rng.uniform(0, 1, (6, 1))], 1)
        s = rng.uniform(0.02, 0.1, 6)
        assert weighted_cosine_similarity(d, g, s) == pytest.approx(_direct_cosine(d, g, s))


def test_the_detections_y_axis_counts():
    """HumanSD's released code replaces the detection's y by its x, so a detection with the
    right x and any y scores the same. The intended formula must tell them apart."""
    gt = np.array([[0, 0, 2], [10, 2, 2], [5, 10, 2.0], [8, 6, 2]])
    sigmas = np.ones(4)
    right = weighted_cosine_similarity(gt.copy(), gt, sigmas)
    wrong_y = gt.copy()
    wrong_y[:, 1] = [10, 0, 3, 1]
    assert right == pytest.approx(1)
    assert weighted_cosine_similarity(wrong_y, gt, sigmas) < right - 0.2


def test_cap_rewards_shape_over_position():
    k = 17
    rng = np.random.default_rng(1)
    gt = np.zeros((1, k, 3))
    gt[0, :, :2] = rng.uniform(100, 300, (k, 2))
    gt[0, :, 2] = 2
    shifted = gt.copy()
    shifted[0, :, :2] = gt[0, :, :2] * 0.5  # same shape, half size, elsewhere: OKS fails
    metric = PoseAP()
    metric.update(
        [{"keypoints": torch.tensor(shifted), "scores": torch.ones(1)}],
        [{"keypoints": torch.tensor(gt)}],
    )
    result = metric.compute()
    assert result["ap"].item() == 0
    assert result["cap"].item() == pytest.approx(1.0)  # CAP compares shape only
