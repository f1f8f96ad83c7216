"""HandPoseAccuracy (PCK, detection rate, hand AP) and InferenceTimer on hand-made cases."""

from __future__ import annotations

import numpy as np
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
    # mean error over the matched hand's 21 keypoints: (7 x 15 + 3 x 25) / 21 px, size 100 px
    assert out["hand_mpjpe_px"].item() == pytest.approx(180 / 21)
    assert out["hand_mpjpe"].item() == pytest.approx(180 / 21 / 100)
    # OKS with WholeBody hand sigmas and the hand's own 100 x 100 box is 0.551 (11 exact
    # keypoints, 7 off by 15 px, 3 by 25): a match at thresholds 0.50 and 0.55 only, each with
    # precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points; AP = 2/10 of that
    assert out["hand_ap"].item() == pytest.approx(2 / 10 * 51 / 101)
    # with the person's 400 x 400 area the OKS is 0.858: thresholds 0.50 to 0.85 (8 of 10)
    person = HandPoseAccuracy()
    person.update(
        [
            {"keypoints": detected[None], "scores": torch.ones(1)},
            {"keypoints": torch.zeros(0, 21, 3), "scores": torch.zeros(0)},
        ],
        [
            {"keypoints": given[None], "areas": torch.tensor([400.0**2])},
            {"keypoints": missed[None], "areas": torch.tensor([400.0**2])},
        ],
    )
    assert person.compute()["hand_ap"].item() == pytest.approx(8 / 10 * 51 / 101)


def test_no_matched_hand_has_no_error():
    metric = HandPoseAccuracy()
    metric.update(
        [{"keypoints": torch.zeros(0, 21, 3), "scores": torch.zeros(0)}],
        [{"keypoints": _hand()[None]}],
    )
    out = metric.compute()
    assert torch.isnan(out["hand_mpjpe"]) and out["detection_rate"] == 0
    assert torch.isnan(out["hand_confidence"])


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


def test_hands_too_far_away_are_out_of_the_matching_not_cut_after_it():
    from metrics.hand_pose import match_hands

    a, b = _hand().numpy(), _hand(offset=(150, 0)).numpy()  # 100 px hands
    near_b, stray = _hand(offset=(140, 0)).numpy(), _hand(offset=(1000, 0)).numpy()
    # unrestricted, the least total pairs a with near_b (140 px) and b with the stray
    # (850 px), and cutting those at one hand size afterwards would leave nothing
    assert match_hands(np.stack([near_b, stray]), np.stack([a, b])) == [(0, 1)]


def test_confidence_is_averaged_over_detected_hands_only():
    a, b, c = _hand(), _hand(offset=(200, 0)), _hand(offset=(0, 200))
    metric = HandPoseAccuracy()
    # three given hands, two found with scores 0.9 and 0.6, and a stray detection (0.2)
    metric.update(
        [{"keypoints": torch.stack([b, a, _hand(offset=(900, 900))]),
          "scores": torch.tensor([0.6, 0.9, 0.2])}],
        [{"keypoints": torch.stack([a, b, c])}],
    )  # fmt: skip
    out = metric.compute()
    assert out["detection_rate"].item() == pytest.approx(2 / 3)
    assert out["hand_confidence"].item() == pytest.approx((0.9 + 0.6) / 2)
    # missing the 0.6 hand raises the confidence while the detection rate falls
    metric.reset()
    metric.update(
        [{"keypoints": a[None], "scores": torch.tensor([0.9])}],
        [{"keypoints": torch.stack([a, b, c])}],
    )
    out = metric.compute()
    assert out["hand_confidence"].item() == pytest.approx(0.9)
    assert out["detection_rate"].item() == pytest.approx(1 / 3)


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
