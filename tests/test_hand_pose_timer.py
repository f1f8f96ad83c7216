"""HandPoseAccuracy (PCK, detection rate, hand AP) and InferenceTimer on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from metrics import HandPoseAccuracy, InferenceTimer


def _hand(offset=(0.0, 0.0), size=100.0):
    kp = torch.zeros(21, 3)
    kp[:, 0] = torch.linspace(0, size, 21) + offset[0]
    kp[:, 1] = torch.linspace(0, size, 21).flip(0) + offset[1]
    kp[:, 2] = 2
    return kp


def test_pck_and_detection_rate_by_hand():
    given = _hand()  # keypoint box 100 x 100: thresholds 10 px and 20 px
    detected = given.clone()
    detected[:7, 0] += 15  # 7 keypoints off by 15 px: wrong at 0.1, right at 0.2
    detected[7:10, 1] += 25  # 3 keypoints off by 25 px: wrong at both
    missed = _hand(offset=(300, 300))
    metric = HandPoseAccuracy()
    metric.update(
        [
            {"keypoints": detected[None], "scores": torch.ones(1)},
            {"keypoints": torch.zeros(0, 21, 3), "scores": torch.zeros(0)},
        ],
        [{"keypoints": given[None]}, {"keypoints": missed[None]}],
    )
    out = metric.compute()
    assert out["pck@0.1"].item() == pytest.approx((21 - 10) / 42)
    assert out["pck@0.2"].item() == pytest.approx((21 - 3) / 42)
    assert out["detection_rate"].item() == pytest.approx(0.5)
    assert 0 <= out["hand_ap"].item() < 1


def test_matching_is_one_to_one_and_nearest():
    a, b = _hand(), _hand(offset=(200, 0))
    metric = HandPoseAccuracy()
    # detections in the opposite order, both exact
    metric.update(
        [{"keypoints": torch.stack([b, a]), "scores": torch.ones(2)}],
        [{"keypoints": torch.stack([a, b])}],
    )
    out = metric.compute()
    assert out["pck@0.1"].item() == 1 and out["detection_rate"].item() == 1
    assert out["hand_ap"].item() == pytest.approx(1.0)
    metric.reset()
    metric.update(
        [{"keypoints": a[None], "scores": torch.ones(1)}], [{"keypoints": torch.stack([a, b])}]
    )
    assert metric.compute()["detection_rate"].item() == 0.5


def test_inference_timer_median_p90_and_warmup():
    timer = InferenceTimer(warmup=2)
    for seconds in (100.0, 50.0, 1.0, 2.0, 3.0, 4.0, 5.0):  # the first two are warm-up
        timer.update(seconds * 4, num_images=4)
    out = timer.compute()
    assert out["median"].item() == 3.0
    assert out["p90"].item() == pytest.approx(4.6)


def test_inference_timer_measures_a_block():
    import time

    timer = InferenceTimer(warmup=0)
    with timer.measure(num_images=2):
        time.sleep(0.05)
    assert 0.02 < timer.compute()["median"].item() < 0.2
