"""The pose stack: MediaPipe's bundled models decoded as MediaPipe does, every person, hands
found around wrists and put on their owner, and the rtmlib backend's conventions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from datamodules.converter import read_rgb
from pose_estimation import MediaPipePeople, MMPoseBottomUp
from pose_estimation.attribution import attribute_hands
from pose_estimation.blazepose import refine_from_heatmap
from pose_estimation.mediapipe_hands import (
    PALM_LANDMARKS,
    Hand,
    merge_hands,
    palm_scores,
    wrist_roi,
)
from pose_estimation.mediapipe_tflite import (
    Detection,
    Roi,
    aligned_roi,
    decode_detections,
    letterbox,
    ssd_anchors,
    unletterbox,
    weighted_nms,
)

PHOTOS = Path(__file__).parent / "data" / "real_photos"
LIMBS = list(range(5, 17))  # COCO-17 shoulders .. ankles: the labels' 12 joints


def _tensor(image: np.ndarray) -> torch.Tensor:
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255


# --- decoding, checked against hand computations ---------------------------------------------


def test_pose_detector_anchors_follow_mediapipes_layout():
    anchors = ssd_anchors(224, (8, 16, 32, 32, 32))
    assert anchors.shape == (2254, 2)  # 28*28*2 + 14*14*2 + 7*7*6
    np.testing.assert_allclose(anchors[0], [0.5 / 28, 0.5 / 28])
    np.testing.assert_allclose(anchors[1], anchors[0])  # two anchors per cell
    np.testing.assert_allclose(anchors[2], [1.5 / 28, 0.5 / 28])  # then the next column
    np.testing.assert_allclose(anchors[2 * 28], [0.5 / 28, 1.5 / 28])  # then the next row
    np.testing.assert_allclose(anchors[1568], [0.5 / 14, 0.5 / 14])  # stride 16 starts
    np.testing.assert_allclose(anchors[1960:1966], [[0.5 / 7, 0.5 / 7]] * 6)  # 3 merged layers


def test_detections_decode_relative_to_their_anchor():
    anchors = np.array([[0.25, 0.5], [0.75, 0.5]])
    raw = np.zeros((2, 8))
    raw[1] = [22.4, -11.2, 44.8, 22.4, 0.0, 0.0, 11.2, 11.2]  # in 224 px input units
    logits = np.array([[-3.0], [2.0]])  # sigmoid: 0.047, 0.881
    (d,) = decode_detections(raw, logits, anchors, 224, min_score=0.5)
    # centre (0.75 + 0.1, 0.5 - 0.05), size (0.2, 0.1)
    np.testing.assert_allclose(d.box, [0.75, 0.4, 0.95, 0.5])
    np.testing.assert_allclose(d.keypoints, [[0.75, 0.5], [0.8, 0.55]])
    assert d.score == pytest.approx(1 / (1 + math.exp(-2)))


def test_weighted_nms_averages_a_cluster_by_score():
    a = Detection(np.array([0.0, 0.0, 1.0, 1.0]), np.array([[0.0, 0.0]]), 0.9)
    b = Detection(np.array([0.1, 0.0, 1.1, 1.0]), np.array([[1.0, 0.0]]), 0.6)  # IoU 0.82
    c = Detection(np.array([5.0, 5.0, 6.0, 6.0]), np.array([[5.0, 5.0]]), 0.7)
    first, second = weighted_nms([b, c, a], 0.3)
    np.testing.assert_allclose(first.box, [0.04, 0.0, 1.04, 1.0])  # (0.9*0 + 0.6*0.1) / 1.5
    np.testing.assert_allclose(first.keypoints, [[0.4, 0.0]])
    assert first.score == 0.9 and second.score == 0.7


def test_letterbox_round_trip():
    image = np.zeros((100, 200, 3), np.uint8)
    tensor, placement = letterbox(image, 224)
    assert tensor.shape == (224, 224, 3)
    np.testing.assert_allclose(placement, [0, 56 / 224, 1, 112 / 224])
    # the image's bottom-right corner sits at the end of its band in the input
    np.testing.assert_allclose(unletterbox(np.array([1.0, 168 / 224]), placement), [1.0, 1.0])
    # an odd padding (224 - 150 = 74 -> 37 above, 37 below; 427 / 640 * 224 = 149.45 -> 149)
    tensor, placement = letterbox(np.full((427, 640, 3), 255, np.uint8), 224)
    rows = np.flatnonzero(tensor[:, 100, 0] > 0)
    np.testing.assert_allclose(placement[[1, 3]] * 224, [rows[0], len(rows)])
    np.testing.assert_allclose(
        unletterbox(np.array([0.5, (rows[-1] + 1) / 224]), placement), [0.5, 1.0]
    )
    tiny, _ = letterbox(np.zeros((1, 500, 3), np.uint8), 224)  # a 1-pixel-high strip
    assert tiny.shape == (224, 224, 3)


def test_roi_maps_crop_pixels_to_rotated_image_pixels():
    roi = Roi(np.array([100.0, 50.0]), 40.0, math.pi / 2)
    # the crop's centre is the ROI's centre; +x in the crop is +y in the image (90 degrees)
    np.testing.assert_allclose(roi.to_image(np.array([[128.0, 128.0]]), 256), [[100.0, 50.0]])
    np.testing.assert_allclose(roi.to_image(np.array([[256.0, 128.0]]), 256), [[100.0, 70.0]])
    image = np.zeros((120, 200, 3), np.uint8)
    image[68:73, 98:103] = 255  # a dot at (100, 70)
    crop = roi.crop(image, 256)
    y, x = np.argwhere(crop[..., 0] > 128).mean(0)
    assert abs(x - 256) < 20 and abs(y - 128) < 6  # at the crop's right edge, mid-height


def test_aligned_roi_turns_the_hips_to_shoulders_axis_upright():
    upright = aligned_roi(np.array([100.0, 100.0]), np.array([100.0, 50.0]), 1.25, math.pi / 2)
    assert upright.rotation == pytest.approx(0.0) and upright.side == pytest.approx(125.0)
    lying = aligned_roi(np.array([100.0, 100.0]), np.array([150.0, 100.0]), 1.0, math.pi / 2)
    assert lying.rotation == pytest.approx(math.pi / 2)
    # the crop's "up" (0, -1) points from start to end in the image
    top = lying.to_image(np.array([[128.0, 0.0]]), 256)[0]
    np.testing.assert_allclose(top, [150.0, 100.0])


def test_heatmap_refinement_moves_to_the_weighted_centroid():
    heatmap = np.full((8, 8, 1), -20.0)
    heatmap[4, 5, 0] = heatmap[4, 6, 0] = 20.0  # sigmoid 1 at columns 5 and 6 of row 4
    (x, y), = refine_from_heatmap(np.array([[5.2 / 8, 4.1 / 8]]), heatmap)  # fmt: skip
    assert x == pytest.approx(5.5 / 8, abs=1e-6) and y == pytest.approx(4 / 8, abs=1e-6)
    flat = np.full((8, 8, 1), -20.0)  # no peak >= 0.5: unchanged
    np.testing.assert_allclose(refine_from_heatmap(np.array([[0.3, 0.3]]), flat), [[0.3, 0.3]])


def test_each_hand_takes_the_score_of_its_nearest_palm():
    hands = np.zeros((2, 21, 2))
    hands[0, list(PALM_LANDMARKS)] = [100, 100]
    hands[1, list(PALM_LANDMARKS)] = [300, 50]
    # three palms, the middle one without landmarks (dropped by the landmark model)
    palms = [(298.0, 55.0, 0.9), (200.0, 200.0, 0.4), (104.0, 97.0, 0.7)]
    np.testing.assert_allclose(palm_scores(hands, palms), [0.7, 0.9])
    # one palm left: it goes to the hand on it, not to the first hand
    np.testing.assert_allclose(palm_scores(hands, palms[:1]), [0.0, 0.9])


# --- hands: crops, duplicates, owners --------------------------------------------------------


def _hand(wrist, direction=(0.0, -1.0), length=30.0) -> np.ndarray:
    """A straight 21-point hand from ``wrist`` along ``direction``, ``length`` px long."""
    wrist, direction = np.asarray(wrist, float), np.asarray(direction, float)
    side = np.array([-direction[1], direction[0]])
    points = [wrist]
    for finger in range(5):
        for joint in range(1, 5):
            points.append(wrist + direction * length * joint / 4 + side * (finger - 2) * 4)
    return np.concatenate([np.array(points), np.ones((21, 1))], 1)


def _body(left_wrist, left_elbow, right_wrist, right_elbow) -> np.ndarray:
    body = np.zeros((17, 3))
    body[5], body[6] = [*left_elbow, 0.9], [*right_elbow, 0.9]  # shoulders (not used here)
    body[7], body[8] = [*left_elbow, 0.9], [*right_elbow, 0.9]
    body[9], body[10] = [*left_wrist, 0.9], [*right_wrist, 0.9]
    return body


def test_a_wrist_crop_is_centred_half_a_hand_past_the_wrist():
    roi = wrist_roi(np.array([100.0, 200.0]), np.array([100.0, 260.0]), 40.0, 3.0)
    np.testing.assert_allclose(roi.centre, [100.0, 180.0])  # forearm points up: 20 px up
    assert roi.side == 120.0 and roi.rotation == 0.0
    assert np.allclose(wrist_roi(np.array([5.0, 5.0]), None, 40.0, 3.0).centre, [5.0, 5.0])


def test_duplicate_hands_merge_to_the_best_scored():
    a = Hand(_hand((100, 100)), 0.6, "left")
    b = Hand(_hand((102, 101)), 0.9, "left")  # the same hand, found in a wrist crop
    c = Hand(_hand((200, 100)), 0.7, "right")
    kept = merge_hands([a, b, c])
    assert [h.score for h in kept] == [0.9, 0.7]


def test_hands_go_to_the_wrist_and_forearm_they_match():
    # person 0 stands at x=100, person 1 at x=300; forearms point up (elbow below wrist)
    bodies = [
        _body((120, 200), (120, 260), (80, 200), (80, 260)),
        _body((320, 200), (320, 260), (280, 200), (280, 260)),
    ]
    hands = [
        _hand((121, 198)),  # person 0's left
        _hand((282, 203)),  # person 1's right
        _hand((318, 205), direction=(0, 1)),  # at person 1's left wrist, but bent back
        _hand((200, 200)),  # between them, near nobody
    ]
    owners = attribute_hands(bodies, hands)
    assert owners == {0: (0, "left"), 1: (1, "right")}


def test_two_hands_on_one_wrist_the_nearer_wins():
    bodies = [_body((120, 200), (120, 260), (80, 200), (80, 260))]
    owners = attribute_hands(bodies, [_hand((128, 200)), _hand((121, 201))])
    assert owners == {1: (0, "left")}


def test_a_hand_too_big_for_the_forearm_is_not_attributed():
    bodies = [_body((120, 200), (120, 260), (80, 200), (80, 260))]  # forearm 60 px
    assert attribute_hands(bodies, [_hand((121, 199), length=200.0)]) == {}
    assert attribute_hands(bodies, [_hand((121, 199), length=40.0)]) == {0: (0, "left")}


def test_hagrid_body_is_the_person_the_hands_belong_to():
    from datamodules.convert_hagrid import _owner

    bystander = _body((120, 200), (120, 260), (80, 200), (80, 260))
    gesturer = _body((320, 200), (320, 260), (280, 200), (280, 260))
    hands = [_hand((281, 199)), _hand((321, 201))]
    body, sides = _owner([bystander, gesturer], hands)
    assert body is gesturer and sides == {0: "right", 1: "left"}
    body, sides = _owner([bystander], hands)  # the hands fit nobody found: no body
    assert not (body[:, 2] > 0).any() and sides == {}


# --- real photos ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people_estimator():
    return MediaPipePeople()


@pytest.fixture(scope="module")
def labels():
    return json.loads((PHOTOS / "labels.json").read_text())["photos"]


def _box(points: np.ndarray) -> np.ndarray:
    return np.r_[points.min(0), points.max(0)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


def _recalled(truth: list, people: list[dict]) -> list[int | None]:
    """Index of the detected person whose limb-joint box has IoU >= 0.5 with each labelled
    person's (the measure of benchmarks/pose_stack.py)."""
    out = []
    for person in truth:
        person = np.asarray(person)
        labelled = person[:, 2] > 0
        box = _box(person[labelled, :2])
        ious = [_iou(box, _box(np.asarray(p["body"])[LIMBS][labelled, :2])) for p in people]
        best = int(np.argmax(ious)) if ious else None
        out.append(best if best is not None and ious[best] >= 0.5 else None)
    return out


def _hand_on(people: list[dict], wrist, size: float) -> tuple[int, str] | None:
    """(person, side) of the stored hand whose wrist is within half a hand of ``wrist``."""
    for n, person in enumerate(people):
        for side in ("left", "right"):
            hand = person[f"{side}_hand"]
            if hand is not None and np.linalg.norm(hand[0, :2] - wrist) <= 0.5 * size:
                return n, side
    return None


def test_every_person_and_their_small_hands_in_a_street_photo(people_estimator, labels):
    # MediaPipe's legacy pose graph kept one of these two people, and whole-image palm
    # detection found none of their hands (20-30 px on a 640 px photo)
    truth = labels["crowdpose_103319.jpg"]
    people = people_estimator.people(read_rgb(PHOTOS / "crowdpose_103319.jpg"))
    recalled = _recalled(truth["people"], people)
    assert None not in recalled and len(set(recalled)) == 2
    found = 0
    for hand in truth["hands"]:
        on = _hand_on(people, hand["wrist"], hand["size"])
        if on is not None:
            found += 1
            assert on == (recalled[hand["person"]], hand["side"])  # its owner, its side
    assert found >= 3  # of 4


def test_hands_of_a_labelled_person_among_two(people_estimator, labels):
    truth = labels["mpii_004645041.jpg"]
    people = people_estimator.people(read_rgb(PHOTOS / "mpii_004645041.jpg"))
    assert sum((np.asarray(p["body"])[:, 2] > 0).any() for p in people) == 2
    (owner,) = _recalled(truth["people"], people)
    assert owner is not None
    for hand in truth["hands"]:
        assert _hand_on(people, hand["wrist"], hand["size"]) == (owner, hand["side"])


def test_a_40px_hand_is_found_on_its_side_with_its_keypoints(people_estimator, labels):
    (hand,) = labels["panoptic_ex2_2_000040_l.jpg"]["hands"]
    people = people_estimator.people(read_rgb(PHOTOS / "panoptic_ex2_2_000040_l.jpg"))
    n, side = _hand_on(people, hand["wrist"], hand["size"])
    assert side == "left"
    given = np.asarray(hand["keypoints"])
    error = np.linalg.norm(people[n]["left_hand"][:, :2] - given[:, :2], axis=-1)
    assert (error <= 0.2 * hand["size"]).mean() >= 0.85  # PCK@0.2


def test_astronaut_body_keypoints_are_where_a_body_is():
    (result,) = MediaPipePeople(part="body").estimate(_tensor(skimage.data.astronaut()))
    assert result["keypoints"].shape == (1, 17, 3) and result["scores"].shape == (1,)
    kp = result["keypoints"][0]
    nose, l_eye, r_eye, l_sh, r_sh = kp[0], kp[1], kp[2], kp[5], kp[6]
    assert nose[1] < l_sh[1] and nose[1] < r_sh[1] and l_eye[1] < nose[1] > r_eye[1]
    # facing the camera: the person's left side is on the image's right
    assert l_sh[0] > nose[0] > r_sh[0] and l_eye[0] > r_eye[0]
    assert 150 < nose[0] < 300 and 60 < nose[1] < 200
    assert (kp[:7, 2] > 0.9).all()


def test_no_person_gives_an_empty_result():
    (body,) = MediaPipePeople(part="body").estimate(torch.zeros(1, 3, 64, 64))
    assert body["keypoints"].shape == (0, 17, 3) and body["scores"].shape == (0,)
    (hands,) = MediaPipePeople(part="hands").estimate(torch.zeros(1, 3, 64, 64))
    assert hands["keypoints"].shape == (0, 21, 3) and hands["sides"] == []


def test_hands_part_returns_each_hand_with_score_and_side():
    image = read_rgb(PHOTOS / "panoptic_ex2_2_000040_l.jpg")
    (result,) = MediaPipePeople(part="hands").estimate(_tensor(image))
    assert result["keypoints"].shape == (len(result["sides"]), 21, 3)
    assert ((result["scores"] >= 0.5) & (result["scores"] <= 1)).all()  # palm scores
    assert "left" in result["sides"]  # her labelled left hand, seen as hers


def test_hands_alone_are_hand_only_entries_on_the_unmirrored_side(labels):
    # a hand crop or a hand photo: no body model, every hand its own entry, side from
    # MediaPipe's handedness swapped for an ordinary photo
    (hand,) = labels["panoptic_ex2_2_000040_l.jpg"]["hands"]
    people = MediaPipePeople(detect_bodies=False).people(
        read_rgb(PHOTOS / "panoptic_ex2_2_000040_l.jpg")
    )
    assert people and all(not (p["body"][:, 2] > 0).any() for p in people)
    assert _hand_on(people, hand["wrist"], hand["size"])[1] == "left"


def test_a_hand_near_nobody_is_kept_hand_only_not_glued_to_the_person(monkeypatch):
    from pose_estimation.blazepose import BlazePosePerson

    # one "person" whose every landmark sits in the corner, far from the signer's hands
    landmarks = np.tile([[5.0, 5.0, 1.0]], (33, 1))
    landmarks[12, :2] = [40.0, 5.0]  # shoulders 35 px apart: a reference length exists
    estimator = MediaPipePeople()
    monkeypatch.setattr(estimator, "_body", lambda image: [BlazePosePerson(landmarks, 0.9, 0.9)])
    people = estimator.people(read_rgb(PHOTOS / "panoptic_ex2_2_000040_l.jpg"))
    assert people[0]["left_hand"] is None and people[0]["right_hand"] is None
    assert len(people) >= 2 and not (people[1]["body"][:, 2] > 0).any()


def test_native_start_up_notices_are_hidden_and_nothing_else(capfd):
    import os

    from pose_estimation.native_logs import start_up_notices_hidden

    with start_up_notices_hidden():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"E0000 something really went wrong\n")
    assert capfd.readouterr().err == "E0000 something really went wrong\n"


def test_mmpose_without_compiled_mmcv_explains_itself():
    try:
        import mmcv._ext  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="mmcv"):
            MMPoseBottomUp("config.py", "model.pth")
    else:
        pytest.skip("mmcv ops are compiled here")
