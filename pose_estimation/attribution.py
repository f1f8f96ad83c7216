"""Which person a detected hand belongs to.

A hand is attributed to the (person, side) whose body wrist its own wrist matches: within
``gate`` x that arm's reference length (its forearm, but at least half the shoulder width,
since a forearm pointing at the camera looks short; half the shoulder width without a
labelled elbow), its wrist-to-knuckles direction within ``max_angle`` of the forearm's (a hand
bends at most ~90 degrees at the wrist), and its size plausible for that length. Among the
pairs that pass, the assignment is one to one with the least total distance (Hungarian). The
side is the body's (COCO-17 left/right wrist), never MediaPipe's handedness label, which
assumes a mirrored image. A hand matching nobody stays unattributed: the caller keeps it as a
hand-only entry.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from pose_estimation.keypoints import keypoint_extent

# COCO-17 indices per side: shoulder, elbow, wrist
ARM = {"left": (5, 7, 9), "right": (6, 8, 10)}
KNUCKLES = (5, 9, 13, 17)  # finger bases of the 21-point hand
HAND_TO_FOREARM = 0.75  # adult hand length / forearm length (anthropometry)
PLAUSIBLE_HAND_SIZE = (0.3, 2.0)  # detected hand size / reference length


def _reference_length(body: np.ndarray, side: str, min_score: float) -> tuple[float, bool]:
    """The arm's reference length: its forearm, but at least half the shoulder width (a forearm
    pointing at the camera looks short), or half the shoulder width without a labelled elbow;
    and whether the elbow is labelled."""
    _, elbow, wrist = ARM[side]
    shoulders = 0.0
    if body[5, 2] >= min_score and body[6, 2] >= min_score:
        shoulders = 0.5 * float(np.linalg.norm(body[5, :2] - body[6, :2]))
    if body[elbow, 2] >= min_score:
        forearm = float(np.linalg.norm(body[wrist, :2] - body[elbow, :2]))
        return max(forearm, shoulders), forearm > 0
    return shoulders, False


def attribute_hands(
    bodies: list[np.ndarray],
    hands: list[np.ndarray],
    gate: float = 0.6,
    max_angle: float = 100.0,
    min_score: float = 0.1,
) -> dict[int, tuple[int, str]]:
    """``{hand index: (person index, "left" | "right")}`` for COCO-17 ``bodies`` ``[17, 3]``
    (x, y, score) and 21-point ``hands`` ``[21, >=2]``; unattributed hands are absent.
    ``min_score``: a body keypoint counts when its score is at least this."""
    slots = []  # (person, side, wrist xy, forearm direction or None, reference length)
    for n, body in enumerate(bodies):
        for side, (_, elbow, wrist) in ARM.items():
            if body[wrist, 2] < min_score:
                continue
            length, has_elbow = _reference_length(body, side, min_score)
            if length <= 0:
                continue
            forearm = body[wrist, :2] - body[elbow, :2]
            direction = forearm / np.linalg.norm(forearm) if has_elbow else None
            slots.append((n, side, body[wrist, :2], direction, length))
    if not slots or not hands:
        return {}
    min_cos = math.cos(math.radians(max_angle))
    cost = np.full((len(hands), len(slots)), np.inf)
    for h, hand in enumerate(hands):
        span = hand[list(KNUCKLES), :2].mean(0) - hand[0, :2]
        size = keypoint_extent(hand)
        for s, (_, _, wrist, direction, length) in enumerate(slots):
            distance = float(np.linalg.norm(hand[0, :2] - wrist)) / length
            if distance > gate:
                continue
            if direction is not None:
                norm = np.linalg.norm(span)
                if norm > 0 and float(direction @ span) / norm < min_cos:
                    continue
                if not PLAUSIBLE_HAND_SIZE[0] <= size / length <= PLAUSIBLE_HAND_SIZE[1]:
                    continue
            cost[h, s] = distance
    finite = np.isfinite(cost)
    rows, cols = linear_sum_assignment(np.where(finite, cost, 1e9))
    return {
        int(h): (slots[s][0], slots[s][1]) for h, s in zip(rows, cols, strict=True) if finite[h, s]
    }
