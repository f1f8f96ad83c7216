"""The MediaPipe backends on real photos that ship with installed packages (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from metrics.pose_estimators import BLAZEPOSE_TO_COCO, MediaPipeBody, MediaPipeHands, MMPoseBottomUp


def _tensor(image: np.ndarray) -> torch.Tensor:
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def body():
    return MediaPipeBody()


def test_astronaut_body_keypoints_are_where_a_body_is(body):
    (result,) = body.estimate(_tensor(skimage.data.astronaut()))
    assert result["keypoints"].shape == (1, 17, 3) and result["scores"].shape == (1,)
    kp = result["keypoints"][0]
    nose, l_eye, r_eye, l_sh, r_sh = kp[0], kp[1], kp[2], kp[5], kp[6]
    assert ((kp[:7, :2] >= 0) & (kp[:7, :2] <= 512)).all()  # head and shoulders inside
    assert nose[1] < l_sh[1] and nose[1] < r_sh[1]  # the nose above the shoulders
    assert l_eye[1] < nose[1] and r_eye[1] < nose[1]  # eyes above the nose
    # facing the camera: the person's left side is on the image's right
    assert l_sh[0] > nose[0] > r_sh[0]
    assert l_eye[0] > r_eye[0]
    # the face is in the upper-middle part of the 512x512 photo
    assert 150 < nose[0] < 300 and 60 < nose[1] < 200
    assert (kp[:7, 2] > 0.9).all()


def test_body_finds_a_person_in_other_photos(body):
    camera = _tensor(skimage.data.camera())
    (result,) = body.estimate(camera)
    assert len(result["keypoints"]) == 1


def test_no_person_gives_an_empty_result(body):
    (result,) = body.estimate(torch.zeros(1, 3, 64, 64))
    assert result["keypoints"].shape == (0, 17, 3) and result["scores"].shape == (0,)


def test_hands_backend_runs_and_returns_the_protocol():
    # No photo with a bare, visible hand ships in the installed packages, so this
    # checks the protocol, not hand localisation: the astronaut's hands are gloved/hidden.
    (result,) = MediaPipeHands().estimate(_tensor(skimage.data.astronaut()))
    assert result["keypoints"].shape[1:] == (21, 3)
    assert len(result["scores"]) == len(result["keypoints"]) == len(result["handedness"])


def test_blazepose_mapping_is_a_coco_order():
    assert len(BLAZEPOSE_TO_COCO) == 17 and len(set(BLAZEPOSE_TO_COCO)) == 17


def test_mmpose_without_compiled_mmcv_explains_itself():
    try:
        import mmcv._ext  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="mmcv"):
            MMPoseBottomUp("config.py", "model.pth")
    else:
        pytest.skip("mmcv ops are compiled here")


def test_each_hand_takes_the_score_of_its_nearest_palm():
    from metrics.pose_estimators import PALM_LANDMARKS, palm_scores

    hands = np.zeros((2, 21, 2))
    hands[0, list(PALM_LANDMARKS)] = [100, 100]
    hands[1, list(PALM_LANDMARKS)] = [300, 50]
    # three palms, the middle one without landmarks (dropped by the landmark model)
    palms = [(298.0, 55.0, 0.9), (200.0, 200.0, 0.4), (104.0, 97.0, 0.7)]
    np.testing.assert_allclose(palm_scores(hands, palms), [0.7, 0.9])
    # one palm left: it goes to the hand on it, not to the first hand
    np.testing.assert_allclose(palm_scores(hands, palms[:1]), [0.0, 0.9])
