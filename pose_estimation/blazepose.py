"""Every person in a photo with MediaPipe's BlazePose models: the multi-person detector the
legacy ``mp.solutions.pose`` graph cuts to one person, then the landmark model per person.

Per image: ``pose_detection.tflite`` on the letterboxed 224 px image (SSD, weighted NMS; its
box is the face, its keypoints hip centre, full-body scale point, shoulder centre, upper-body
scale point), one rotated ROI per detection (centred on the hips, side 2.5 x hips-to-scale
point, upright: MediaPipe's PoseDetectionToRoi), ``pose_landmark_full.tflite`` on that ROI at
256 px (33 landmarks, heatmap-refined as MediaPipe does), kept when its pose flag is > 0.5.
Two ROIs that land on the same person are merged (the higher score stays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pose_estimation.mediapipe_tflite import (
    Detection,
    TFLiteModel,
    aligned_roi,
    bundled_model,
    decode_detections,
    letterbox,
    ssd_anchors,
    unletterbox,
    weighted_nms,
)

# BlazePose's 33 landmarks -> COCO-17 (nose, eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles; left before right). BlazePose indices: 0 nose, 2/5 left/right eye (centre),
# 7/8 ears, 11/12 shoulders, 13/14 elbows, 15/16 wrists, 23/24 hips, 25/26 knees, 27/28 ankles.
BLAZEPOSE_TO_COCO = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
# nose and shoulders: what an occluded or cut-off person still shows, and what ROIs of
# different scale agree on (elbows and hips they guess differently when hidden)
HEAD_AND_SHOULDERS = (0, 11, 12)
DETECTOR_STRIDES = (8, 16, 32, 32, 32)
LANDMARK_SIZE, HEATMAP_KERNEL = 256, 7


@dataclass
class BlazePosePerson:
    landmarks: np.ndarray  # [33, 3] image pixels x, y and visibility in [0, 1]
    score: float  # pose flag x mean visibility of the COCO-17 landmarks
    detection_score: float

    def coco17(self) -> np.ndarray:
        """``[17, 3]`` COCO-order keypoints, visibility as the score."""
        return self.landmarks[list(BLAZEPOSE_TO_COCO)].copy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def refine_from_heatmap(xy: np.ndarray, heatmap: np.ndarray, kernel: int = HEATMAP_KERNEL):
    """MediaPipe's RefineLandmarksFromHeatmapCalculator: each landmark ``xy [N, 2]`` (normalised
    to the crop) moves to the sigmoid-weighted centroid of the ``kernel`` x ``kernel`` window
    of its heatmap ``[h, w, N]`` (logits) around it, when that window's peak is >= 0.5."""
    h, w = heatmap.shape[:2]
    out = xy.copy()
    offset = (kernel - 1) // 2
    for j, (x, y) in enumerate(xy):
        cx, cy = int(x * w), int(y * h)
        rows = slice(max(0, cy - offset), min(h, cy + offset + 1))
        cols = slice(max(0, cx - offset), min(w, cx + offset + 1))
        window = _sigmoid(heatmap[rows, cols, j])
        if window.size == 0 or window.max() < 0.5:
            continue
        r, c = np.mgrid[rows, cols]
        out[j] = [(c * window).sum() / window.sum() / w, (r * window).sum() / window.sum() / h]
    return out


def _starts(length: int, side: int) -> list[int]:
    """Tile origins along one axis: stride ``side / 2``, the last tile flush with the end."""
    if side >= length:
        return [0]
    starts = list(range(0, length - side, max(1, side // 2)))
    return [*starts, length - side]


def same_person(a: np.ndarray, b: np.ndarray, tolerance: float = 0.35) -> bool:
    """Two landmark sets ``[33, 3]`` of one person: nose and shoulders within ``tolerance`` x
    the (larger) shoulder width of each other on average. Two people side by side are at
    least a head apart, about half a shoulder width or more."""
    pa, pb = a[list(HEAD_AND_SHOULDERS), :2], b[list(HEAD_AND_SHOULDERS), :2]
    width = max(np.linalg.norm(pa[1] - pa[2]), np.linalg.norm(pb[1] - pb[2]), 1.0)
    return float(np.linalg.norm(pa - pb, axis=-1).mean()) < tolerance * width


class BlazePoseDetector:
    """``detector(image)`` with an RGB ``[H, W, 3]`` uint8 image returns every person found,
    best score first. ``min_detection_score``: the detector's threshold (MediaPipe's 0.5);
    ``min_pose_flag``: the landmark model's pose-presence threshold (MediaPipe: 0.5; 0.3 keeps
    people cut by the frame, whose flag the landmark model lowers);
    ``tile_zooms``: extra detection passes on tiles (:meth:`detect`), ``()`` for none."""

    def __init__(
        self,
        min_detection_score: float = 0.5,
        min_pose_flag: float = 0.3,
        tile_zooms: tuple[int, ...] = (2,),
        num_threads: int = 1,
    ):
        self.min_detection_score = min_detection_score
        self.min_pose_flag = min_pose_flag
        self.tile_zooms = tuple(tile_zooms)
        self.detector = TFLiteModel(
            bundled_model("pose_detection/pose_detection.tflite"), num_threads
        )
        self.landmarker = TFLiteModel(
            bundled_model("pose_landmark/pose_landmark_full.tflite"), num_threads
        )
        self.anchors = ssd_anchors(self.detector.size[0], DETECTOR_STRIDES)

    def _detect_view(self, view: np.ndarray) -> list[Detection]:
        """Detections in one view, box and keypoints in the view's pixels."""
        size = self.detector.size[0]
        tensor, placement = letterbox(view, size)
        raw, logits = self.detector((tensor * 2 - 1)[None])  # the detector takes [-1, 1]
        found = decode_detections(raw[0], logits[0], self.anchors, size, self.min_detection_score)
        scale = np.array(view.shape[1::-1], dtype=np.float64)
        return [
            Detection(
                unletterbox(d.box.reshape(2, 2), placement).reshape(-1) * np.tile(scale, 2),
                unletterbox(d.keypoints, placement) * scale,
                d.score,
            )
            for d in found
        ]

    def detect(self, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Person detections ``(keypoints [4, 2] image pixels, score)``, best first, on the
        whole image and, for people too small for the detector's 224 px input, on overlapping
        tiles of ``1 / zoom`` of the image's longer side (stride half a tile). Each view is
        reduced by MediaPipe's weighted NMS on its face boxes; across views the face boxes
        differ in scale, so there a detection is dropped when its hip and shoulder centres both
        lie within 0.15 x its body scale of a better one's."""
        found = weighted_nms(self._detect_view(image), 0.3)
        height, width = image.shape[:2]
        for zoom in self.tile_zooms:
            side = math.ceil(max(height, width) / zoom)
            for y0 in _starts(height, side):
                for x0 in _starts(width, side):
                    view = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
                    offset = np.array([x0, y0], dtype=np.float64)
                    found += [
                        Detection(d.box + np.tile(offset, 2), d.keypoints + offset, d.score)
                        for d in weighted_nms(self._detect_view(view), 0.3)
                    ]
        kept: list[Detection] = []
        for d in sorted(found, key=lambda d: -d.score):
            scale = np.linalg.norm(d.keypoints[1] - d.keypoints[0])
            if not any(
                np.linalg.norm(d.keypoints[[0, 2]] - k.keypoints[[0, 2]], axis=-1).max()
                < 0.15 * scale
                for k in kept
            ):
                kept.append(d)
        return [(d.keypoints, d.score) for d in kept]

    def landmarks(
        self, image: np.ndarray, keypoints: np.ndarray, upper_body: bool = False
    ) -> tuple[np.ndarray, float]:
        """Landmarks ``[33, 3]`` (pixels, visibility) of the person whose detection keypoints
        are given, and the pose flag. The ROI spans the full body (hip centre to its scale
        point, x 1.25: the wheel's graph) or, with ``upper_body``, the shoulders' (shoulder
        centre to the upper-body point, x 1.5: MediaPipe's later graphs)."""
        if upper_body:
            roi = aligned_roi(keypoints[2], keypoints[3], 1.5, math.pi / 2)
        else:
            roi = aligned_roi(keypoints[0], keypoints[1], 1.25, math.pi / 2)
        crop = roi.crop(image, LANDMARK_SIZE).astype(np.float32) / 255.0
        raw, flag, _, heatmap, _ = self.landmarker(crop[None])
        values = raw.reshape(-1, 5)[:33]
        xy = refine_from_heatmap(values[:, :2] / LANDMARK_SIZE, heatmap[0])
        points = roi.to_image(xy * LANDMARK_SIZE, LANDMARK_SIZE)
        return np.concatenate([points, _sigmoid(values[:, 3:4])], 1), float(flag.reshape(-1)[0])

    def __call__(self, image: np.ndarray) -> list[BlazePosePerson]:
        kept: list[BlazePosePerson] = []
        # best detections first; a detection whose full-body ROI lands on someone already kept
        # (an occluded person behind them) or finds no pose is retried on its upper body
        for keypoints, score in self.detect(image):
            for upper_body in (False, True):
                landmarks, flag = self.landmarks(image, keypoints, upper_body)
                coco = landmarks[list(BLAZEPOSE_TO_COCO), 2]
                person = BlazePosePerson(landmarks, flag * float(coco.mean()), score)
                if flag > self.min_pose_flag and not any(
                    same_person(landmarks, k.landmarks) for k in kept
                ):
                    kept.append(person)
                    break
        return sorted(kept, key=lambda p: -p.score)
