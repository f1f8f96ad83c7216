"""The offline default people estimator: MediaPipe's bundled models, every person, their hands.

Bodies from :class:`~pose_estimation.blazepose.BlazePoseDetector` (all people, tiles for
small ones); hands from MediaPipe Hands on the whole image and on a crop around each
person's wrists (:mod:`pose_estimation.mediapipe_hands`), duplicates merged; each hand given
to the person and side its wrist and forearm match (:mod:`pose_estimation.attribution`),
the others kept as hand-only entries whose side is MediaPipe's handedness, unmirrored.
"""

from __future__ import annotations

import numpy as np

from pose_estimation.attribution import ARM, attribute_hands
from pose_estimation.blazepose import BlazePoseDetector
from pose_estimation.mediapipe_hands import Hand, MediaPipeHandFinder, merge_hands, wrist_roi
from pose_estimation.mediapipe_tflite import Roi
from pose_estimation.people import Part, PeopleEstimator, assign_hands, bbox_of

HAND_TO_FOREARM = 0.75  # adult hand length / forearm length


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
        return assign_hands(bodies, [(h.keypoints, h.score) for h in found], self.attribution_gate)

    def people_for_part(self, image: np.ndarray) -> list[dict]:
        if self.part == "hands":
            return self.people(image)
        return [
            {"body": p.coco17(), "score": p.score, "left_hand": None, "right_hand": None,
             "left_hand_score": 0.0, "right_hand_score": 0.0, "bbox": bbox_of(p.coco17())}
            for p in self.body(image)
        ]  # fmt: skip

    def people(self, image: np.ndarray) -> list[dict]:
        found = self.body(image) if self.detect_bodies else []
        bodies, scores = [p.coco17() for p in found], [p.score for p in found]
        hands = self.find_hands(image, bodies)
        owners = attribute_hands(bodies, [h.keypoints for h in hands], self.attribution_gate)
        people = [
            {"body": body, "score": score, "left_hand": None, "right_hand": None,
             "left_hand_score": 0.0, "right_hand_score": 0.0}
            for body, score in zip(bodies, scores, strict=True)
        ]  # fmt: skip
        for h, hand in enumerate(hands):
            if h in owners:
                n, side = owners[h]
            else:  # a hand-only entry, on MediaPipe's (unmirrored) side
                n, side = len(people), hand.side
                people.append({"body": np.zeros((17, 3)), "score": hand.score, "left_hand": None,
                               "right_hand": None, "left_hand_score": 0.0,
                               "right_hand_score": 0.0})  # fmt: skip
            people[n][f"{side}_hand"], people[n][f"{side}_hand_score"] = hand.keypoints, hand.score
        for person in people:
            person["bbox"] = bbox_of(person["body"], person["left_hand"], person["right_hand"])
        return people
