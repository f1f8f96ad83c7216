"""Pose estimators that the pose metrics run on generated images.

One protocol: ``estimate(images)`` with images ``[N, 3, H, W]`` float in [0, 1] returns one
dict per image, ``{"keypoints": Tensor[P, K, 3] (x, y, score) in pixels, "scores": Tensor[P]}``
— the ``preds`` format of :class:`metrics.PoseAP`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

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


class MediaPipeHands:
    """MediaPipe Hands (palm detector + 21-landmark model shipped in the wheel).

    Landmarks are in the 21-point order of the sample schema. MediaPipe gives no per-landmark
    confidence, so every keypoint carries the hand's handedness score, which is also the
    instance score. ``"handedness"`` lists MediaPipe's labels, which assume a mirrored
    (selfie) image: for an ordinary photo its "Left" is the person's right hand.
    """

    num_keypoints = 21

    def __init__(self, max_num_hands: int = 4, min_detection_confidence: float = 0.5):
        self.max_num_hands = max_num_hands
        self.min_detection_confidence = min_detection_confidence
        self._hands = None

    def estimate(self, images: torch.Tensor) -> list[dict]:
        import mediapipe as mp

        if self._hands is None:
            self._hands = mp.solutions.hands.Hands(
                static_image_mode=True,
                max_num_hands=self.max_num_hands,
                min_detection_confidence=self.min_detection_confidence,
            )
        out = []
        for image in _to_uint8_hwc(images):
            h, w = image.shape[:2]
            result = self._hands.process(image)
            hands, scores, labels = [], [], []
            for landmarks, handedness in zip(
                result.multi_hand_landmarks or [], result.multi_handedness or [], strict=True
            ):
                score = handedness.classification[0].score
                hands.append([[p.x * w, p.y * h, score] for p in landmarks.landmark])
                scores.append(score)
                labels.append(handedness.classification[0].label)
            out.append({
                "keypoints": torch.tensor(hands).reshape(-1, 21, 3),
                "scores": torch.tensor(scores).reshape(-1),
                "handedness": labels,
            })  # fmt: skip
        return out


class MMPoseBottomUp:
    """An mmpose 1.x bottom-up model (HumanSD used HigherHRNet-w48 trained on Human-Art),
    from a model config and checkpoint. Needs mmcv built with its ops (DESIGN.md: a ~34 min
    build with ``-std=c++20``); without it, construction fails with that explanation."""

    def __init__(self, config: str, checkpoint: str, device: str = "cpu"):
        try:
            from mmpose.apis import inference_bottomup, init_model
        except (ImportError, ModuleNotFoundError) as exc:
            raise ImportError(
                f"MMPoseBottomUp needs mmpose inference, which needs mmcv compiled with its "
                f"ops ({exc}). Build mmcv 2.1.0 from source with -std=c++20 (see DESIGN.md), "
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
