"""Hand pose accuracy of generated hands against the hand poses they were conditioned on."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric

from metrics.keypoint_sigmas import HAND_SIGMAS
from metrics.pose_ap import PoseAP
from pose_estimation.keypoints import keypoint_extent

PCK_ALPHAS = (0.1, 0.2)


def keypoint_errors(detected: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, float]:
    """Distances (px) from a detected hand ``[21, 3]`` to a given one ``[21, 3]`` over the
    given hand's labelled keypoints, and the given hand's size (:func:`keypoint_extent`)."""
    labelled = given[:, 2] > 0
    error = np.linalg.norm(detected[labelled, :2] - given[labelled, :2], axis=-1)
    return error, keypoint_extent(given)


def match_hands(
    detected: np.ndarray, given: np.ndarray, gate: float = 1.0
) -> list[tuple[int, int]]:
    """One-to-one ``(detected, given)`` pairs of detected ``[N, 21, 3]`` and given ``[M, 21, 3]``
    hands that minimise the total mean distance over each given hand's labelled keypoints
    (Hungarian), among pairs whose mean distance is at most ``gate`` x the given hand's size
    (:func:`keypoint_extent`): a hand found elsewhere in the image is not this hand."""
    if len(detected) == 0 or len(given) == 0:
        return []
    cost = np.full((len(given), len(detected)), np.inf)
    for g, hand in enumerate(given):
        labelled = hand[:, 2] > 0
        if not labelled.any():
            continue
        d = np.linalg.norm(detected[:, labelled, :2] - hand[None, labelled, :2], axis=-1).mean(-1)
        cost[g] = np.where(d <= gate * keypoint_extent(hand), d, np.inf)
    allowed = np.isfinite(cost)
    rows, cols = linear_sum_assignment(np.where(allowed, cost, 1e12))
    return [(int(c), int(r)) for r, c in zip(rows, cols, strict=True) if allowed[r, c]]


class HandPoseAccuracy(Metric):
    """How well a hand detector recovers the conditioning hand poses from generated images.

    ``update(preds, target)`` with the :class:`~metrics.pose_ap.PoseAP` format for 21-point
    hands (``preds[i]["keypoints"]`` ``[N, 21, 3]`` detected with ``"scores"`` ``[N]`` detection
    scores, ``target[i]["keypoints"]`` ``[M, 21, 3]`` given, optional ``"areas"`` ``[M]``: the
    area of each hand's person). ``compute()`` returns, headline first:

    - ``pck@0.1``, ``pck@0.2``: fraction of labelled given keypoints whose matched detection
      lies within ``alpha * max(w, h)`` of them, (w, h) the given hand's keypoint bounding
      box; a hand with no matched detection counts all its keypoints as misses;
    - ``hand_mpjpe``, ``hand_mpjpe_px``: MPJPE-2D, the mean keypoint error of matched hands,
      as a fraction of the hand's size ``max(w, h)`` and in pixels (averaged over keypoints);
    - ``detection_rate``: fraction of given hands matched to a detection (one-to-one,
      minimal mean keypoint distance; a pair counts only when that distance is at most
      ``match_gate`` x the given hand's size, so a hand found elsewhere is not this hand);
    - ``hand_confidence``: mean detection score of the matched hands, over detected hands
      only (as Hand1000's Hand-Conf): read it with ``detection_rate``, since it can rise while
      fewer hands are found;
    - ``hand_ap``, ``hand_ap50``, ``hand_ap75``: keypoint AP with COCO-WholeBody hand sigmas,
      the OKS scale being the person's area where given (as COCO-WholeBody), else the hand's
      keypoint box. A hand's OKS with its own small box is harsh: on a 40 px hand 2 px of
      keypoint noise already gives AP ~0.01, hence PCK and MKE as the headline.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, match_gate: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.match_gate = match_gate
        self.ap = PoseAP(kind="hand", **kwargs)
        for alpha in PCK_ALPHAS:
            self.add_state(
                f"correct_{alpha}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
            )
        self.add_state("keypoints", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("matched_keypoints", default=torch.tensor(0), dist_reduce_fx="sum")
        zero = torch.tensor(0.0, dtype=torch.float64)
        for name in ("error_px", "error_rel"):
            self.add_state(name, default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("matched", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("confidence", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("hands", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[dict], target: list[dict], image_ids=None) -> None:
        self.ap.update(preds, target, image_ids)
        k = len(HAND_SIGMAS)
        for pred, tgt in zip(preds, target, strict=True):
            detected = torch.as_tensor(pred["keypoints"]).double().reshape(-1, k, 3).cpu().numpy()
            given = torch.as_tensor(tgt["keypoints"]).double().reshape(-1, k, 3).cpu().numpy()
            given = given[(given[:, :, 2] > 0).any(-1)]
            self.hands += len(given)
            self.keypoints += int((given[:, :, 2] > 0).sum())
            scores = torch.as_tensor(pred["scores"]).double().reshape(-1).cpu().numpy()
            for d, g in match_hands(detected, given, self.match_gate):
                error, size = keypoint_errors(detected[d], given[g])
                self.matched += 1
                self.confidence += float(scores[d])
                self.matched_keypoints += len(error)
                self.error_px += float(error.sum())
                self.error_rel += float(error.sum() / max(size, 1e-6))
                for alpha in PCK_ALPHAS:
                    name = f"correct_{alpha}"
                    setattr(self, name, getattr(self, name) + int((error <= alpha * size).sum()))

    def compute(self) -> dict[str, torch.Tensor]:
        ap = self.ap.compute()
        out = {f"hand_{k}": ap[k] for k in ("ap", "ap50", "ap75")}
        for alpha in PCK_ALPHAS:
            out[f"pck@{alpha}"] = getattr(self, f"correct_{alpha}") / self.keypoints.clamp(min=1)
        out["detection_rate"] = self.matched / self.hands.clamp(min=1)
        # no matched hand: no error to report (NaN, shown as "–"), not a perfect 0
        matched = self.matched_keypoints.double()
        nan = torch.tensor(float("nan"))
        out["hand_mpjpe"] = self.error_rel / matched if matched > 0 else nan
        out["hand_mpjpe_px"] = self.error_px / matched if matched > 0 else nan
        out["hand_confidence"] = self.confidence / self.matched if self.matched > 0 else nan
        return {k: v.double() for k, v in out.items()}

    def reset(self) -> None:
        super().reset()
        self.ap.reset()
