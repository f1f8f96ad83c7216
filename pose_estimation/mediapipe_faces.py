"""Face boxes from MediaPipe's face detector (the models shipped in the mediapipe wheel)."""

from __future__ import annotations

import numpy as np

from pose_estimation.native_logs import start_up_notices_hidden


class MediaPipeFaces:
    """``faces(image)``: the face boxes ``[(x0, y0, x1, y1)]`` px of an RGB ``[H, W, 3]`` uint8
    image, clipped to it. ``full_range`` (default): the model for faces up to 5 m away, as in
    full-body photos; otherwise the short-range (selfie) model."""

    def __init__(self, min_confidence: float = 0.5, full_range: bool = True):
        self.min_confidence = min_confidence
        self.full_range = full_range
        self._detector = None  # built lazily: MediaPipe graphs do not pickle into workers

    def __call__(self, image: np.ndarray) -> list[tuple[float, float, float, float]]:
        from mediapipe.python.solutions import face_detection

        image = np.ascontiguousarray(image)
        if self._detector is None:
            with start_up_notices_hidden():  # the graph prints them on its first image
                self._detector = face_detection.FaceDetection(
                    model_selection=int(self.full_range),
                    min_detection_confidence=self.min_confidence,
                )
                result = self._detector.process(image)
        else:
            result = self._detector.process(image)
        height, width = image.shape[:2]
        boxes = []
        for detection in result.detections or []:
            box = detection.location_data.relative_bounding_box
            x0, y0 = max(box.xmin * width, 0.0), max(box.ymin * height, 0.0)
            x1 = min((box.xmin + box.width) * width, width)
            y1 = min((box.ymin + box.height) * height, height)
            if x1 > x0 and y1 > y0:
                boxes.append((x0, y0, x1, y1))
        return boxes
