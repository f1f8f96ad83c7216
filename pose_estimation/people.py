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
        """Hands for given COCO-17 ``bodies`` ``[17, 3]`` (e.g. a dataset's labelled people):
        one dict per body with ``left_hand`` / ``right_hand`` (``[21, 3]`` or None) and their
        scores. Every hand this estimator finds is attributed to the given bodies
        (:func:`~pose_estimation.attribution.attribute_hands`); the rest are left out."""
        found = [
            (p[f"{s}_hand"], p[f"{s}_hand_score"])
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


def assign_hands(
    bodies: list[np.ndarray], hands: list[tuple[np.ndarray, float]], gate: float = 0.6
) -> list[dict]:
    """``hands`` ``(keypoints [21, 3], score)`` put on the ``bodies`` they are attributed to:
    one ``{"left_hand", "right_hand", "left_hand_score", "right_hand_score"}`` per body."""
    from pose_estimation.attribution import attribute_hands

    out = [{"left_hand": None, "right_hand": None, "left_hand_score": 0.0,
            "right_hand_score": 0.0} for _ in bodies]  # fmt: skip
    owners = attribute_hands(bodies, [h[0] for h in hands], gate)
    for h, (n, side) in owners.items():
        out[n][f"{side}_hand"], out[n][f"{side}_hand_score"] = hands[h]
    return out
