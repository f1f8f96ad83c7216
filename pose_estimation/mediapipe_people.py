"""The offline default people estimator: MediaPipe's bundled models, every person, their hands.

Bodies from :class:`~pose_estimation.blazepose.BlazePoseDetector` (all people, tiles for
small ones); hands from MediaPipe Hands on the whole image and on a crop around each
person's wrists (:mod:`pose_estimation.mediapipe_hands`), duplicates merged; each hand given
to the person and side its wrist and forearm match (:mod:`pose_estimation.attribution`),
the others kept as hand-only entries whose side is MediaPipe's handedness, unmirrored.
"""

from __future__ import annotations

import numpy as np

from pose_estimation.attribution import ARM, HAND_TO_FOREARM
from pose_estimation.blazepose import BlazePoseDetector
from pose_estimation.mediapipe_hands import (
    PALM_LANDMARKS,
    Hand,
    MediaPipeHandFinder,
    merge_hands,
    wrist_roi,
)
from pose_estimation.mediapipe_tflite import Roi
from pose_estimation.people import Part, PeopleEstimator, assign_hands, new_person, with_boxes


class MediaPipePeople(PeopleEstimator):
    """Every person and hand in an image with the models shipped in the mediapipe wheel.

    ``part``: what :meth:`estimate` returns (``"body"`` or ``"hands"``);
    ``min_detection_score``, ``min_pose_flag``, ``tile_zooms``: the body detector's
    (:class:`~pose_estimation.blazepose.BlazePoseDetector`); ``min_hand_score``: the palm
    detector's threshold; ``hand_crops``: also look for hands around each wrist, the crop
    ``crop_scale`` x the expected hand length; ``attribution_gate``: how far (in forearm
    lengths) a hand's wrist may be from a body wrist to be that person's; ``detect_bodies``:
    False for images of hands alone (a generated hand crop), where every hand is a hand-only
    entry and the body models are not run.
    """

    def __init__(
        self,
        part: Part = "body",
        min_detection_score: float = 0.5,
        min_pose_flag: float = 0.3,
        tile_zooms: tuple[int, ...] = (2,),
        min_hand_score: float = 0.5,
        max_num_hands: int = 4,
        hand_crops: bool = True,
        crop_scale: float = 3.0,
        attribution_gate: float = 0.6,
        detect_bodies: bool = True,
    ):
        if part not in ("body", "hands"):
            raise ValueError(f"part={part!r}: expected 'body' or 'hands'")
        self.part = part
        self.body_settings = dict(
            min_detection_score=min_detection_score,
            min_pose_flag=min_pose_flag,
            tile_zooms=tuple(tile_zooms),
        )
        self.hands = MediaPipeHandFinder(max_num_hands, min_hand_score)
        self.hand_crops = hand_crops
        self.crop_scale = crop_scale
        self.attribution_gate = attribution_gate
        self.detect_bodies = detect_bodies
        self._body = None  # built lazily: interpreters do not pickle into workers

    @property
    def body(self) -> BlazePoseDetector:
        if self._body is None:
            self._body = BlazePoseDetector(**self.body_settings)
        return self._body

    def wrist_rois(self, body: np.ndarray) -> list[Roi]:
        """Crops around both wrists of a COCO-17 body ``[17, 3]`` whose wrist scores at least
        0.1 (MediaPipe Holistic's wrist gate); the hand is expected to be 0.75 x the forearm
        long, or 0.4 x the shoulder width without an elbow."""
        rois = []
        for _, elbow, wrist in ARM.values():
            if body[wrist, 2] < 0.1:
                continue
            if body[elbow, 2] >= 0.1:
                length = HAND_TO_FOREARM * np.linalg.norm(body[wrist, :2] - body[elbow, :2])
                arm = body[elbow, :2]
            elif body[5, 2] >= 0.1 and body[6, 2] >= 0.1:
                length, arm = 0.4 * np.linalg.norm(body[5, :2] - body[6, :2]), None
            else:
                continue
            if length >= 4:
                rois.append(wrist_roi(body[wrist, :2], arm, length, self.crop_scale))
        return rois

    def find_hands(self, image: np.ndarray, bodies: list[np.ndarray]) -> list[Hand]:
        """Hands on the whole image and around the wrists of COCO-17 ``bodies``, merged."""
        hands = self.hands(image)
        if self.hand_crops:
            rois = [roi for body in bodies for roi in self.wrist_rois(body)]
            hands += self.hands.in_rois(image, rois)
        return merge_hands(hands)

    def hands_on(self, image: np.ndarray, bodies: list[np.ndarray]) -> list[dict]:
        found = self.find_hands(image, bodies)
        return assign_hands(
            bodies, [(h.keypoints, h.score, h.side) for h in found], self.attribution_gate
        )

    def bodies(self, image: np.ndarray) -> list[dict]:
        """Every person's body, no hands (cheaper than :meth:`people`)."""
        return with_boxes([new_person(p.coco17(), p.score) for p in self.body(image)])

    def hands_in_box(self, image: np.ndarray, box: list[float]) -> Hand | None:
        """The hand MediaPipe finds in a crop twice the size of ``box`` ``[x, y, w, h]`` (image
        pixels) whose palm centre is nearest the box's centre; None when there is none."""
        x, y, w, h = box
        centre = np.array([x + w / 2, y + h / 2])
        found = self.hands.in_rois(image, [Roi(centre, 2 * max(w, h, 1.0), 0.0)])
        if not found:
            return None
        palms = [hand.keypoints[list(PALM_LANDMARKS), :2].mean(0) for hand in found]
        return found[int(np.argmin([np.linalg.norm(p - centre) for p in palms]))]

    def people_for_part(self, image: np.ndarray) -> list[dict]:
        return self.people(image) if self.part == "hands" else self.bodies(image)

    def people(self, image: np.ndarray) -> list[dict]:
        found = self.body(image) if self.detect_bodies else []
        bodies = [p.coco17() for p in found]
        hands = [(h.keypoints, h.score, h.side) for h in self.find_hands(image, bodies)]
        return assign_hands(bodies, hands, self.attribution_gate, [p.score for p in found])
