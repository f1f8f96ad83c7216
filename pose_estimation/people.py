"""The estimator protocol shared by the annotator, the converters' fill-ins and the metrics.

A people estimator's ``people(image)`` takes an RGB ``[H, W, 3]`` uint8 image and returns one
dict per person, best first: ``"bbox"`` ``[x, y, w, h]``, ``"body"`` ``[17, 3]`` COCO-17 (x, y,
score; all zero for a hand-only entry), ``"left_hand"`` / ``"right_hand"`` ``[21, 3]`` or None
(the person's own sides), ``"score"`` and ``"left_hand_score"`` / ``"right_hand_score"``.

``estimate(images)`` with images ``[N, 3, H, W]`` float in [0, 1] returns one dict per image
in the ``preds`` format of :class:`metrics.PoseAP`: for ``part="body"``, ``{"keypoints":
[P, 17, 3], "scores": [P]}`` over people with a body; for ``part="hands"``, every hand,
``{"keypoints": [N, 21, 3], "scores": [N], "sides": [N]}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, Protocol

import numpy as np
import torch

from pose_estimation.attribution import attribute_hands

Part = Literal["body", "hands"]
SIDES = ("left", "right")


class PoseEstimator(Protocol):
    def estimate(self, images: torch.Tensor) -> list[dict]: ...


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` float in [0, 1] -> ``[N, H, W, 3]`` uint8."""
    return (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def bbox_of(*parts: np.ndarray | None) -> list[float]:
    """``[x, y, w, h]`` of the labelled (score > 0) points of the given ``[K, 3]`` parts."""
    points = [p[p[:, 2] > 0, :2] for p in parts if p is not None]
    points = np.concatenate(points) if points else np.zeros((0, 2))
    if len(points) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def has_body(person: dict) -> bool:
    return bool((np.asarray(person["body"])[:, 2] > 0).any())


class PeopleEstimator(ABC):
    """Base of the people estimators: subclasses implement :meth:`people`."""

    part: Part = "body"

    @abstractmethod
    def people(self, image: np.ndarray) -> list[dict]:
        """Every person in an RGB ``[H, W, 3]`` uint8 image (the module docstring's format)."""

    def people_for_part(self, image: np.ndarray) -> list[dict]:
        """What :meth:`estimate` needs for ``self.part`` (a backend may skip work the part
        does not use)."""
        return self.people(image)

    def hands_on(self, image: np.ndarray, bodies: list[np.ndarray]) -> list[dict]:
        """People for given COCO-17 ``bodies`` ``[17, 3]`` (e.g. a dataset's labelled people,
        in that order) with every hand this estimator finds attributed to them
        (:func:`assign_hands`), then the hands that fit none as hand-only entries."""
        found = [
            (p[f"{s}_hand"], p[f"{s}_hand_score"], s)
            for p in self.people(image) for s in SIDES if p[f"{s}_hand"] is not None
        ]  # fmt: skip
        return assign_hands(bodies, found)

    def estimate(self, images: torch.Tensor) -> list[dict]:
        out = []
        for image in to_uint8_hwc(images):
            people = self.people_for_part(image)
            if self.part == "body":
                bodies = [p for p in people if has_body(p)]
                out.append({
                    "keypoints": torch.tensor(np.array([p["body"] for p in bodies]),
                                              dtype=torch.float32).reshape(-1, 17, 3),
                    "scores": torch.tensor([p["score"] for p in bodies], dtype=torch.float32),
                })  # fmt: skip
                continue
            hands = [(p[f"{s}_hand"], p[f"{s}_hand_score"], s)
                     for p in people for s in SIDES if p[f"{s}_hand"] is not None]  # fmt: skip
            out.append({
                "keypoints": torch.tensor(np.array([h[0] for h in hands]),
                                          dtype=torch.float32).reshape(-1, 21, 3),
                "scores": torch.tensor([h[1] for h in hands], dtype=torch.float32),
                "sides": [h[2] for h in hands],
            })  # fmt: skip
        return out


def new_person(body: np.ndarray | None = None, score: float = 0.0) -> dict:
    """A person dict with ``body`` ``[17, 3]`` (unlabelled: a hand-only entry) and no hands."""
    return {
        "body": np.zeros((17, 3)) if body is None else body, "score": score,
        "left_hand": None, "right_hand": None, "left_hand_score": 0.0, "right_hand_score": 0.0,
    }  # fmt: skip


def with_boxes(people: list[dict]) -> list[dict]:
    """Set each person's ``bbox`` to the box of their labelled body and hand points."""
    for person in people:
        person["bbox"] = bbox_of(person["body"], person["left_hand"], person["right_hand"])
    return people


def assign_hands(
    bodies: list[np.ndarray],
    hands: list[tuple[np.ndarray, float, str]],
    gate: float = 0.6,
    scores: list[float] | None = None,
) -> list[dict]:
    """People for COCO-17 ``bodies`` (person ``scores``) with the ``hands`` ``(keypoints [21, 3],
    score, side)`` attributed to them (:func:`~pose_estimation.attribution.attribute_hands`,
    the side being the body's), then one hand-only entry per hand that fits nobody, on that
    hand's own ``side``; boxes set."""
    people = [new_person(b, s) for b, s in zip(bodies, scores or [0.0] * len(bodies), strict=True)]
    owners = attribute_hands(bodies, [h[0] for h in hands], gate)
    for h, (keypoints, score, side) in enumerate(hands):
        if h in owners:
            n, side = owners[h]
        else:
            n = len(people)
            people.append(new_person(score=score))
        people[n][f"{side}_hand"], people[n][f"{side}_hand_score"] = keypoints, score
    return with_boxes(people)
