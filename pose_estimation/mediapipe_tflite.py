"""MediaPipe's bundled TFLite models run directly, for what the legacy ``solutions`` graphs
throw away: SSD anchors, detection decoding, MediaPipe's weighted NMS, rotated ROI crops.

The legacy pose graph keeps the first person the detector returns; running
``pose_detection.tflite`` here keeps them all. Every constant below is the one the graphs
compiled into the 0.10.21 wheel use (``PoseDetectionCpu``, ``PoseDetectionToRoi``,
``PoseLandmarkByRoiCpu``), which differ in places from later versions on GitHub.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pose_estimation.native_logs import start_up_notices_hidden


def bundled_model(name: str) -> Path:
    """Path of a model in the mediapipe wheel, e.g. ``pose_detection/pose_detection.tflite``."""
    import mediapipe

    path = Path(mediapipe.__file__).parent / "modules" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in this mediapipe install (handdiff pins 0.10.21)")
    return path


class TFLiteModel:
    """A TFLite model under ai-edge-litert's interpreter: ``model(x)`` with ``x`` float32
    ``[1, H, W, C]`` returns the outputs in the model's output order."""

    def __init__(self, path: Path, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        with start_up_notices_hidden():
            self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = [o["index"] for o in self.interpreter.get_output_details()]
        self.size = tuple(int(v) for v in self.input["shape"][1:3])  # (H, W)
        self._started = False

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.interpreter.set_tensor(self.input["index"], x.astype(np.float32))
        if self._started:
            self.interpreter.invoke()
        else:  # the first run prints the delegate's start-up notices
            with start_up_notices_hidden():
                self.interpreter.invoke()
            self._started = True
        return [self.interpreter.get_tensor(i) for i in self.outputs]


def ssd_anchors(size: int, strides: tuple[int, ...]) -> np.ndarray:
    """Anchor centres ``[A, 2]`` (normalised x, y) of MediaPipe's SsdAnchorsCalculator with
    aspect ratio 1, fixed anchor size (so scales do not matter) and offset 0.5: two anchors per
    cell and layer, layers of equal stride merged (2254 for pose detection at 224 px, strides
    8/16/32/32/32), in the calculator's order (rows, columns, anchors)."""
    anchors = []
    layer = 0
    while layer < len(strides):
        same = [s for s in strides[layer:] if s == strides[layer]]
        cells = math.ceil(size / strides[layer])
        y, x = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        centres = np.stack([(x + 0.5) / cells, (y + 0.5) / cells], -1).reshape(-1, 1, 2)
        anchors.append(np.repeat(centres, 2 * len(same), 1).reshape(-1, 2))
        layer += len(same)
    return np.concatenate(anchors)


@dataclass
class Detection:
    box: np.ndarray  # [4] x0, y0, x1, y1, normalised to the image
    keypoints: np.ndarray  # [K, 2] normalised to the image
    score: float


def decode_detections(
    raw: np.ndarray, logits: np.ndarray, anchors: np.ndarray, size: int, min_score: float
) -> list[Detection]:
    """TensorsToDetections with ``reverse_output_order``: ``raw [A, 4 + 2K]`` holds box centre,
    width, height and K keypoints in input pixels relative to each anchor; scores are
    ``sigmoid(clip(logits, -100, 100))``. Coordinates stay normalised to the (letterboxed)
    input."""
    scores = 1 / (1 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100, 100)))
    keep = np.flatnonzero(scores >= min_score)
    out = []
    for i in keep:
        values = raw[i] / size
        cx, cy = values[0] + anchors[i, 0], values[1] + anchors[i, 1]
        w, h = values[2], values[3]
        keypoints = values[4:].reshape(-1, 2) + anchors[i]
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        out.append(Detection(box, keypoints, float(scores[i])))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    area = np.prod(a[2:] - a[:2])
    areas = np.prod(b[:, 2:] - b[:, :2], -1)
    return inter / np.maximum(area + areas - inter, 1e-12)


def weighted_nms(detections: list[Detection], threshold: float = 0.3) -> list[Detection]:
    """MediaPipe's WEIGHTED non-maximum suppression: the best remaining detection absorbs
    every one overlapping it by IoU > ``threshold``; box and keypoints become the score-weighted
    mean of the cluster, the score stays the best one's."""
    remaining = sorted(detections, key=lambda d: -d.score)
    out = []
    while remaining:
        boxes = np.stack([d.box for d in remaining])
        cluster = _iou(remaining[0].box, boxes) > threshold
        cluster[0] = True
        members = [d for d, c in zip(remaining, cluster, strict=True) if c]
        weights = np.array([d.score for d in members])[:, None]
        out.append(
            Detection(
                (np.stack([d.box for d in members]) * weights).sum(0) / weights.sum(),
                (np.stack([d.keypoints for d in members]) * weights[:, :, None]).sum(0)
                / weights.sum(),
                remaining[0].score,
            )
        )
        remaining = [d for d, c in zip(remaining, cluster, strict=True) if not c]
    return out


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``image [H, W, 3]`` uint8 -> ``[size, size, 3]`` float in [0, 1], aspect kept, centred,
    zero padded, and where the image landed: ``[left, top, width, height]`` as fractions of
    the input, so that input coordinates ``u`` map to image ones by :func:`unletterbox`."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    out = np.zeros((size, size, 3), np.float32)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    out[top : top + new_h, left : left + new_w] = resized.reshape(new_h, new_w, -1) / 255.0
    return out, np.array([left, top, new_w, new_h], dtype=np.float64) / size


def unletterbox(points: np.ndarray, placement: np.ndarray) -> np.ndarray:
    """Normalised letterboxed input coordinates ``[..., 2]`` -> normalised image coordinates
    (MediaPipe's DetectionLetterboxRemovalCalculator), ``placement`` from :func:`letterbox`."""
    return (points - placement[:2]) / placement[2:]


@dataclass
class Roi:
    """A rotated square in image pixels: centre, side and rotation (radians, clockwise in image
    coordinates, i.e. y down)."""

    centre: np.ndarray  # [2]
    side: float
    rotation: float

    def matrix(self, size: int) -> np.ndarray:
        """Affine ``[2, 3]`` from crop pixels (``size`` x ``size``) to image pixels."""
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        scale = self.side / size
        rot = np.array([[c, -s], [s, c]]) * scale
        offset = self.centre - rot @ np.array([size / 2, size / 2])
        return np.concatenate([rot, offset[:, None]], 1)

    def crop(self, image: np.ndarray, size: int, border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
        """The ROI resampled to ``[size, size, 3]`` (bilinear)."""
        return cv2.warpAffine(
            image, self.matrix(size), (size, size),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border,
        )  # fmt: skip

    def to_image(self, points: np.ndarray, size: int) -> np.ndarray:
        """Crop pixels ``[N, 2]`` -> image pixels ``[N, 2]``."""
        m = self.matrix(size)
        return points @ m[:, :2].T + m[:, 2]


def normalize_radians(angle: float) -> float:
    return angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))


def aligned_roi(start: np.ndarray, end: np.ndarray, scale: float, target_angle: float) -> Roi:
    """MediaPipe's AlignmentPointsRectsCalculator + RectTransformation (square_long, no shift):
    a square centred on ``start`` with side ``2 |end - start| * scale``, rotated so that
    ``start -> end`` points at ``target_angle`` (radians, counter-clockwise from +x with y up;
    pi/2 = up)."""
    dx, dy = end - start
    rotation = normalize_radians(target_angle - math.atan2(-dy, dx))
    return Roi(np.asarray(start, dtype=np.float64), 2 * math.hypot(dx, dy) * scale, rotation)
