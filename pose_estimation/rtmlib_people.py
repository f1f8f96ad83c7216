"""RTMPose / RTMO / RTMW / DWPose through rtmlib (ONNX on onnxruntime, no mmcv), from local
model files: the backend for users with those weights.

``model="rtmpose"`` is top-down: a person detector (YOLOX or RTMDet ONNX, ``det``) then the
pose model (``pose``) per box; RTMW and DWPose are RTMPose models with COCO-WholeBody's 133
keypoints, which give each person's hands by construction (no attribution needed).
``model="rtmo"`` is RTMO, one-stage, no detector. rtmlib feeds the models the image as a cv2
BGR array (its documented input), so the RGB images here are flipped to BGR first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from pose_estimation.people import Part, PeopleEstimator, new_person, with_boxes

# COCO-WholeBody (133): body 0-16, feet 17-22, face 23-90, left hand 91-111, right hand
# 112-132; each hand wrist first, then thumb .. little finger from base to tip (the schema's
# 21-point order), "left" being the person's own left as in COCO.
WHOLEBODY_HANDS = {"left": slice(91, 112), "right": slice(112, 133)}


def _local(path: str, name: str) -> str:
    # rtmlib downloads whatever is not an existing file: refuse before it tries
    if not Path(path).is_file():
        raise FileNotFoundError(f"RTMLibPeople {name}={path!r}: no such file (a local .onnx)")
    return str(path)


class RTMLibPeople(PeopleEstimator):
    """People from rtmlib models: COCO-17 bodies, and both hands when the pose model has 133
    keypoints (RTMW, DWPose).

    ``pose``/``det``: local ``.onnx`` files; ``pose_input_size`` is rtmlib's (width, height)
    for RTMPose (RTMW/DWPose: (288, 384)), RTMO's is (height, width) ``det_input_size``-style
    (640, 640); ``det_model``: ``"yolox"`` or ``"rtmdet"``. Keypoint scores are clipped to
    [0, 1]; a hand counts when its mean keypoint score is at least ``min_hand_score``.
    """

    def __init__(
        self,
        pose: str,
        det: str | None = None,
        model: Literal["rtmpose", "rtmo"] = "rtmpose",
        pose_input_size: tuple[int, int] = (192, 256),
        det_model: Literal["yolox", "rtmdet"] = "yolox",
        det_input_size: tuple[int, int] = (640, 640),
        min_hand_score: float = 0.3,
        device: str = "cpu",
        part: Part = "body",
    ):
        from rtmlib import RTMO, YOLOX, RTMDet, RTMPose

        if part not in ("body", "hands"):
            raise ValueError(f"part={part!r}: expected 'body' or 'hands'")
        self.part = part
        self.min_hand_score = min_hand_score
        pose = _local(pose, "pose")
        if model == "rtmo":
            self.detector = None
            self.pose = RTMO(pose, model_input_size=tuple(pose_input_size), device=device)
        elif model == "rtmpose":
            if det is None:
                raise ValueError("RTMLibPeople model='rtmpose' needs det= (a YOLOX/RTMDet .onnx)")
            detector = {"yolox": YOLOX, "rtmdet": RTMDet}[det_model]
            self.detector = detector(
                _local(det, "det"), model_input_size=tuple(det_input_size), device=device
            )
            self.pose = RTMPose(pose, model_input_size=tuple(pose_input_size), device=device)
        else:
            raise ValueError(f"model={model!r}: expected 'rtmpose' or 'rtmo'")

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rtmlib's keypoints ``[P, K, 2]`` (image pixels) and scores ``[P, K]`` for an RGB
        image; no people: empty arrays."""
        bgr = np.ascontiguousarray(image[..., ::-1])
        if self.detector is None:
            keypoints, scores = self.pose(bgr)
            alive = np.asarray(scores).reshape(len(keypoints), -1).max(-1) > 0
            return np.asarray(keypoints)[alive], np.asarray(scores)[alive]
        boxes = self.detector(bgr)
        if len(boxes) == 0:  # rtmlib's RTMPose would take the whole image as one box
            return np.zeros((0, 17, 2)), np.zeros((0, 17))
        keypoints, scores = self.pose(bgr, bboxes=list(boxes))
        return np.asarray(keypoints), np.asarray(scores)

    def people(self, image: np.ndarray) -> list[dict]:
        keypoints, scores = self.raw(image)
        points = np.concatenate(
            [keypoints.astype(np.float64), np.clip(scores, 0, 1)[..., None]], -1
        )
        people = []
        for person in points:
            entry = new_person(person[:17], float(person[:17, 2].mean()))
            if len(person) == 133:
                for side, index in WHOLEBODY_HANDS.items():
                    hand = person[index]
                    if hand[:, 2].mean() >= self.min_hand_score:
                        entry[f"{side}_hand"] = hand
                        entry[f"{side}_hand_score"] = float(hand[:, 2].mean())
            people.append(entry)
        return with_boxes(sorted(people, key=lambda p: -p["score"]))
