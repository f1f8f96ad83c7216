"""MediaPipe Hands (palm detector + 21-landmark model shipped in the wheel), on the whole
image and on crops around each person's wrists.

The palm detector sees the image letterboxed to 192 px, so on a whole 1280 px photo a hand
under about a tenth of the frame is a few pixels wide and missed. MediaPipe Holistic re-crops
hands from the body pose for the same reason; here each wrist's crop (a square of
``crop_scale`` x the hand's expected length, centred half a hand past the wrist along the
forearm) is upsampled to ``crop_size`` px and given to the same palm detector and landmark
model, and hands found twice are merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from pose_estimation.mediapipe_tflite import Roi
from pose_estimation.native_logs import start_up_notices_hidden

PALM_LANDMARKS = (0, 5, 9, 13, 17)  # wrist and finger bases: the palm the detector boxes
# MediaPipe's handedness label -> the person's side in an ordinary (not mirrored) photo
UNMIRRORED = {"Left": "right", "Right": "left"}


@dataclass
class Hand:
    keypoints: np.ndarray  # [21, 3] image pixels x, y and the hand's score
    score: float  # the palm detector's score of the palm it was found from
    side: str  # "left" | "right": the person's side, from MediaPipe's handedness (unmirrored)
    # [21] MediaPipe's relative depth (wrist 0, smaller nearer), in image pixels like x
    depth: np.ndarray | None = None


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


def hand_size(keypoints: np.ndarray) -> float:
    """Longest side of the box of a hand's 21 keypoints ``[21, >=2]``."""
    return float(np.ptp(keypoints[:, :2], 0).max())


def same_hand(a: np.ndarray, b: np.ndarray, tolerance: float = 0.25) -> bool:
    """Two detections ``[21, >=2]`` of one hand: mean keypoint distance under ``tolerance`` x
    the larger hand's size."""
    size = max(hand_size(a), hand_size(b), 1.0)
    return float(np.linalg.norm(a[:, :2] - b[:, :2], axis=-1).mean()) < tolerance * size


def merge_hands(hands: list[Hand]) -> list[Hand]:
    """One detection per hand, the best-scored of each group of duplicates (:func:`same_hand`)."""
    kept: list[Hand] = []
    for hand in sorted(hands, key=lambda h: -h.score):
        if not any(same_hand(hand.keypoints, k.keypoints) for k in kept):
            kept.append(hand)
    return kept


def wrist_roi(
    wrist: np.ndarray, elbow: np.ndarray | None, hand_length: float, crop_scale: float
) -> Roi:
    """An upright square around where a hand at ``wrist`` should be: centred half a hand
    (``hand_length`` px) past the wrist along the forearm (on the wrist without an elbow),
    side ``crop_scale * hand_length``."""
    centre = np.asarray(wrist, dtype=np.float64)
    if elbow is not None:
        forearm = centre - elbow
        norm = np.linalg.norm(forearm)
        if norm > 0:
            centre = centre + 0.5 * hand_length * forearm / norm
    return Roi(centre, crop_scale * hand_length, 0.0)


class MediaPipeHandFinder:
    """``finder(image)``: hands in an RGB ``[H, W, 3]`` uint8 image; ``finder.in_rois(image,
    rois)``: hands in each region, mapped back to the image. The legacy Hands graph, also asked
    for its palm detections so that each hand carries a detection score (MediaPipe's
    handedness confidence is not one)."""

    def __init__(
        self,
        max_num_hands: int = 4,
        min_detection_confidence: float = 0.5,
        crop_size: int = 256,
        min_presence_confidence: float = 0.5,
    ):
        self.max_num_hands = max_num_hands
        self.min_detection_confidence = min_detection_confidence
        self.min_presence_confidence = min_presence_confidence
        self.crop_size = crop_size
        self._graph = None  # built lazily: MediaPipe graphs do not pickle into workers

    def _solution(self):
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
                "handlandmarkcpu__ThresholdingCalculator.threshold": self.min_presence_confidence,
            },
            outputs=["multi_hand_landmarks", "multi_handedness", "palm_detections"],
        )

    def __call__(self, image: np.ndarray) -> list[Hand]:
        if self._graph is None:
            with start_up_notices_hidden():  # the graph prints them on its first image
                self._graph = self._solution()
                result = self._graph.process(np.ascontiguousarray(image))
        else:
            result = self._graph.process(np.ascontiguousarray(image))
        h, w = image.shape[:2]
        points = np.array(
            [[[p.x * w, p.y * h, p.z * w] for p in hand.landmark]
             for hand in result.multi_hand_landmarks or []]
        ).reshape(-1, 21, 3)  # fmt: skip
        landmarks = points[:, :, :2]
        palms = []
        for detection in result.palm_detections or []:
            box = detection.location_data.relative_bounding_box
            palms.append(
                ((box.xmin + box.width / 2) * w, (box.ymin + box.height / 2) * h,
                 detection.score[0])
            )  # fmt: skip
        scores = palm_scores(landmarks, palms)
        labels = [c.classification[0].label for c in result.multi_handedness or []]
        return [
            Hand(np.concatenate([kp, np.full((21, 1), s)], 1), float(s), UNMIRRORED[label],
                 xyz[:, 2])
            for kp, s, label, xyz in zip(landmarks, scores, labels, points, strict=True)
        ]  # fmt: skip

    def in_rois(self, image: np.ndarray, rois: list[Roi]) -> list[Hand]:
        """Hands found in each (upright) region, resampled to ``crop_size`` px (black outside
        the image), in image pixels."""
        found = []
        for roi in rois:
            crop = roi.crop(image, self.crop_size, border=cv2.BORDER_CONSTANT)
            for hand in self(crop):
                points = roi.to_image(hand.keypoints[:, :2], self.crop_size)
                depth = hand.depth * roi.side / self.crop_size  # crop px -> image px
                found.append(Hand(np.concatenate([points, hand.keypoints[:, 2:]], 1),
                                  hand.score, hand.side, depth))  # fmt: skip
        return found
