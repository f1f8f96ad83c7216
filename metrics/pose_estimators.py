"""Pose estimators that the pose metrics run on generated images.

One protocol: ``estimate(images)`` with images ``[N, 3, H, W]`` float in [0, 1] returns one
dict per image, ``{"keypoints": Tensor[P, K, 3] (x, y, score) in pixels, "scores": Tensor[P]}``
— the ``preds`` format of :class:`metrics.PoseAP`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# BlazePose's 33 landmarks -> COCO-17 (nose, eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles; left before right). BlazePose indices: 0 nose, 2/5 left/right eye (centre),
# 7/8 ears, 11/12 shoulders, 13/14 elbows, 15/16 wrists, 23/24 hips, 25/26 knees, 27/28 ankles.
BLAZEPOSE_TO_COCO = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)


class PoseEstimator(Protocol):
    def estimate(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]: ...


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    return (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class MediaPipeBody:
    """MediaPipe Pose (BlazePose, ``model_complexity=1``, the model the 0.10.21 wheel ships),
    mapped to COCO-17 with :data:`BLAZEPOSE_TO_COCO`; keypoint scores are BlazePose's
    visibilities and the person score is their mean.

    BlazePose finds at most one person per image, so on multi-person images AP counts the
    others as missed and PCE grows; the mmpose backend is the multi-person alternative.
    """

    num_keypoints = 17

    def __init__(self, min_detection_confidence: float = 0.5):
        self.min_detection_confidence = min_detection_confidence
        self._pose = None  # built lazily: MediaPipe graphs do not pickle into workers

    def estimate(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        import mediapipe as mp

        if self._pose is None:
            self._pose = mp.solutions.pose.Pose(
                static_image_mode=True,
                model_complexity=1,
                min_detection_confidence=self.min_detection_confidence,
            )
        out = []
        for image in _to_uint8_hwc(images):
            h, w = image.shape[:2]
            result = self._pose.process(image)
            if result.pose_landmarks is None:
                out.append({"keypoints": torch.zeros(0, 17, 3), "scores": torch.zeros(0)})
                continue
            landmarks = result.pose_landmarks.landmark
            kp = torch.tensor(
                [[landmarks[i].x * w, landmarks[i].y * h, landmarks[i].visibility]
                 for i in BLAZEPOSE_TO_COCO]
            )  # fmt: skip
            out.append({"keypoints": kp[None], "scores": kp[:, 2].mean()[None]})
        return out


PALM_LANDMARKS = (0, 5, 9, 13, 17)
# MediaPipe's handedness label -> the person's side in an ordinary (not mirrored) photo
UNMIRRORED = {
    "Left": "right",
    "Right": "left",
}  # wrist and finger bases: the palm the detector boxes


def palm_scores(landmarks: np.ndarray, palms: list[tuple[float, float, float]]) -> np.ndarray:
    """The detection score of each hand: landmarks ``[N, 21, 2]`` and palm detections
    ``(centre x, centre y, score)`` in the same coordinates, matched one to one so that the
    total distance between palm centres and the hands' palm-landmark means is least (the
    landmark graph drops the palms whose landmarks fail its presence threshold, so the two
    lists need not align); a hand left without a palm scores 0."""
    scores = np.zeros(len(landmarks))
    if len(landmarks) == 0 or not palms:
        return scores
    centres = landmarks[:, list(PALM_LANDMARKS)].mean(1)
    palm_xy = np.array([p[:2] for p in palms])
    cost = np.linalg.norm(centres[:, None] - palm_xy[None], axis=-1)
    hands, matched = linear_sum_assignment(cost)
    scores[hands] = [palms[i][2] for i in matched]
    return scores


class MediaPipeHands:
    """MediaPipe Hands (palm detector + 21-landmark model shipped in the wheel).

    Landmarks are in the 21-point order of the sample schema. The instance score is the palm
    detector's score of the palm each hand was found from (:func:`palm_scores`): a detection
    score to rank hands by for AP, which MediaPipe's handedness confidence is not. MediaPipe
    gives no per-landmark confidence, so every keypoint carries that score. ``"handedness"``
    lists MediaPipe's labels, which assume a mirrored (selfie) image: for an ordinary photo
    its "Left" is the person's right hand, as ``"sides"`` (``"left"``/``"right"``) says.
    """

    num_keypoints = 21

    def __init__(self, max_num_hands: int = 4, min_detection_confidence: float = 0.5):
        self.max_num_hands = max_num_hands
        self.min_detection_confidence = min_detection_confidence
        self._hands = None

    def _solution(self):
        # the Hands solution's graph, also asked for its palm detections (with their scores)
        from mediapipe.python.solution_base import SolutionBase
        from mediapipe.python.solutions import hands

        return SolutionBase(
            binary_graph_path=hands._BINARYPB_FILE_PATH,
            side_inputs={
                "model_complexity": 1,
                "num_hands": self.max_num_hands,
                "use_prev_landmarks": False,
            },
            calculator_params={
                "palmdetectioncpu__TensorsToDetectionsCalculator.min_score_thresh": (
                    self.min_detection_confidence
                ),
                "handlandmarkcpu__ThresholdingCalculator.threshold": 0.5,
            },
            outputs=["multi_hand_landmarks", "multi_handedness", "palm_detections"],
        )

    def estimate(self, images: torch.Tensor) -> list[dict]:
        if self._hands is None:
            self._hands = self._solution()
        out = []
        for image in _to_uint8_hwc(images):
            h, w = image.shape[:2]
            result = self._hands.process(image)
            landmarks = np.array(
                [[[p.x * w, p.y * h] for p in hand.landmark]
                 for hand in result.multi_hand_landmarks or []]
            ).reshape(-1, 21, 2)  # fmt: skip
            palms = []
            for detection in result.palm_detections or []:
                box = detection.location_data.relative_bounding_box
                palms.append(
                    ((box.xmin + box.width / 2) * w, (box.ymin + box.height / 2) * h,
                     detection.score[0])
                )  # fmt: skip
            scores = palm_scores(landmarks, palms)
            keypoints = np.concatenate(
                [landmarks, np.repeat(scores[:, None, None], 21, 1)], -1
            ).reshape(-1, 21, 3)
            labels = [h.classification[0].label for h in result.multi_handedness or []]
            out.append({
                "keypoints": torch.tensor(keypoints, dtype=torch.float32),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "handedness": labels,
                "sides": [UNMIRRORED[label] for label in labels],
            })  # fmt: skip
        return out


class MMPoseBottomUp:
    """An mmpose 1.x bottom-up model (HumanSD used HigherHRNet-w48 trained on Human-Art),
    from a model config and checkpoint. Needs mmcv built with its ops (``docs/mmpose.md``: a
    ~34 min build with ``-std=c++20``); without it, construction fails with that explanation."""

    def __init__(self, config: str, checkpoint: str, device: str = "cpu"):
        try:
            from mmpose.apis import inference_bottomup, init_model
        except (ImportError, ModuleNotFoundError) as exc:
            raise ImportError(
                f"MMPoseBottomUp needs mmpose inference, which needs mmcv compiled with its "
                f"ops ({exc}). Build mmcv 2.1.0 from source with -std=c++20 (docs/mmpose.md), "
                "or use the MediaPipe backend (metrics.pose_estimators.MediaPipeBody)."
            ) from exc
        self._inference = inference_bottomup
        self.model = init_model(config, checkpoint, device=device)

    def estimate(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in _to_uint8_hwc(images):
            # mmpose expects BGR arrays, as read by cv2
            (sample,) = self._inference(self.model, np.ascontiguousarray(image[..., ::-1]))
            instances = sample.pred_instances
            kp = torch.as_tensor(instances.keypoints, dtype=torch.float64)
            scores = torch.as_tensor(instances.keypoint_scores, dtype=torch.float64)
            out.append({
                "keypoints": torch.cat([kp, scores[..., None]], -1),
                "scores": scores.mean(-1) if len(scores) else torch.zeros(0),
            })  # fmt: skip
        return out
