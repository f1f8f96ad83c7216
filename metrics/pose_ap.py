"""Pose accuracy of generated images: COCO keypoint AP, HumanSD's cosine-similarity AP (CAP)
and the people-count error (PCE), as one DDP-aware torchmetrics ``Metric``."""

from __future__ import annotations

import contextlib
import io
from typing import Literal

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from metrics.dist_sync import EmptyRankSafeSync
from metrics.keypoint_sigmas import SIGMAS

STAT_NAMES = ("", "50", "75", "_m", "_l")  # COCOeval.stats[0..4]: AP, AP50, AP75, AP(m), AP(l)
_STATES = (
    "pred_keypoints",
    "pred_scores",
    "pred_image",
    "target_keypoints",
    "target_areas",
    "target_image",
    "image_ids",
)
GtArea = Literal["labelled", "humansd_code"]


def weighted_cosine_similarity(det: np.ndarray, gt: np.ndarray, sigmas: np.ndarray) -> float:
    """HumanSD's "weightedCosineSimilarity" of a detection and a ground truth, ``[K, 3]`` each.

    Over the ground truth's labelled keypoints (``v > 0``): divide x and y by the sigmas,
    min-max normalise each axis, L2-normalise each axis, and take the cosine of the
    concatenated ``(x, y)`` vectors — which equals the mean of the per-axis cosines.

    HumanSD's released code (utils/metrics/coco_similarity.py) normalises the detection's y
    axis with ``yd = xd / ||yd||``, i.e. it compares the ground truth's y against the
    detection's x; this function implements the intended formula. A degenerate axis (fewer
    than two distinct values) has no direction to compare and gives similarity 0, where their
    code produced NaN.
    """
    labelled = gt[:, 2] > 0
    axes = []
    for source in (gt, det):
        for axis in (0, 1):
            values = source[labelled, axis] / sigmas[labelled]
            span = values.max() - values.min() if len(values) else 0.0
            if span <= 0:
                return 0.0
            values = (values - values.min()) / span
            axes.append(values / np.linalg.norm(values))
    xg, yg, xd, yd = axes
    return float((xg @ xd + yg @ yd) / 2.0)


class _CosineSimilarityEval(COCOeval):
    """COCOeval with the weighted cosine similarity in place of OKS: the same matching,
    thresholds (0.50:0.05:0.95) and accumulation, as HumanSD's CAP."""

    def __init__(self, gt: COCO, dt: COCO, sigmas: np.ndarray):
        super().__init__(gt, dt, "keypoints")
        self.sigmas = sigmas

    def computeOks(self, imgId, catId):
        gts = self._gts[imgId, catId]
        dts = self._dts[imgId, catId]
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        dts = [dts[i] for i in order][: self.params.maxDets[-1]]
        if not gts or not dts:
            return []
        similarity = np.zeros((len(dts), len(gts)))
        for j, g in enumerate(gts):
            gk = np.asarray(g["keypoints"], dtype=np.float64).reshape(-1, 3)
            for i, d in enumerate(dts):
                dk = np.asarray(d["keypoints"], dtype=np.float64).reshape(-1, 3)
                similarity[i, j] = weighted_cosine_similarity(dk, gk, self.sigmas)
        return similarity


def ground_truth_box(keypoints: np.ndarray, gt_area: GtArea = "labelled") -> list[float]:
    """``[x, y, w, h]`` of a ground-truth person ``[K, 3]``: the box of its labelled keypoints
    (``labelled``), or, as HumanSD's evaluation code computes it (``humansd_code``), the box
    over all K rows with unlabelled joints stored as (-1, -1): any missing joint stretches the
    box to (-1, -1) and enlarges the OKS scale."""
    if gt_area == "humansd_code":
        points = np.where(keypoints[:, 2:3] > 0, keypoints[:, :2], -1.0)
    else:
        points = keypoints[keypoints[:, 2] > 0, :2]
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def coco_ground_truth(
    image_ids, target_image, target_keypoints, target_areas=None, gt_area: GtArea = "labelled"
) -> COCO:
    """An in-memory COCO ground truth under HumanSD's protocol: one annotation per person with
    at least one labelled keypoint; area = the given ``target_areas`` entry where it is > 0
    (e.g. the whole person's for a hand, as COCO-WholeBody), else the area of
    :func:`ground_truth_box`."""
    annotations = []
    if target_areas is None:
        target_areas = np.zeros(len(target_keypoints))
    for n, (image, kp, given_area) in enumerate(
        zip(target_image, target_keypoints, target_areas, strict=True)
    ):
        labelled = int((kp[:, 2] > 0).sum())
        if labelled == 0:
            continue
        box = ground_truth_box(kp, gt_area)
        area = float(given_area) if given_area > 0 else box[2] * box[3]
        annotations.append({
            "id": n + 1, "image_id": int(image), "category_id": 1, "iscrowd": 0,
            "keypoints": kp.reshape(-1).tolist(), "num_keypoints": labelled,
            "bbox": box, "area": area,
        })  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": int(i)} for i in image_ids],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_detections(gt: COCO, pred_image, pred_keypoints, pred_scores) -> COCO:
    results = [
        {"image_id": int(i), "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
         "score": float(s)}
        for i, kp, s in zip(pred_image, pred_keypoints, pred_scores, strict=True)
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return gt.loadRes(results)
        # loadRes cannot take an empty list; an empty result set is still a valid one
        empty = COCO()
        empty.dataset = {**gt.dataset, "annotations": []}
        empty.createIndex()
        return empty


def _stats(evaluator: COCOeval) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


class PoseAP(EmptyRankSafeSync, Metric):
    """COCO keypoint AP, HumanSD's CAP and PCE of detected poses against the given poses.

    ``update(preds, target, image_ids=None)``: one dict per image, ``preds[i] = {"keypoints":
    [N, K, 3] (x, y, score), "scores": [N]}``, ``target[i] = {"keypoints": [M, K, 3] (x, y, v),
    "areas": [M] (optional)}`` in pixels. ``kind="body"`` is COCO-17 with COCO's sigmas,
    ``kind="hand"`` the 21-point hand with COCO-WholeBody's hand sigmas
    (:mod:`metrics.keypoint_sigmas`). ``areas`` > 0 set a ground truth's OKS scale (a hand
    scored with its person's area, as COCO-WholeBody does); otherwise ``gt_area`` decides:
    ``labelled`` (default) the box of its labelled keypoints, ``humansd_code`` HumanSD's
    released evaluation (:func:`ground_truth_box`).

    ``compute()`` returns ``ap, ap50, ap75, ap_m, ap_l`` — exactly pycocotools
    ``COCOeval(iouType="keypoints").stats[0:5]`` under HumanSD's protocol (ground-truth area as
    above, COCO's ``maxDets = 20``, every image counted) —
    ``cap, cap50, cap75, cap_m, cap_l`` (the same with :func:`weighted_cosine_similarity`) and
    ``pce``, the mean over images of |#given people − #detected people|. AP values are
    fractions (HumanSD's tables show them × 100); -1 means no ground truth, as in COCOeval.

    ``image_ids`` (unique across ranks, e.g. dataset indices) make the result independent of
    how images are split over processes: COCOeval breaks score ties by image order. Without
    them, ids follow the order of ``update`` calls, interleaved over ranks.

    Example:
        >>> metric = PoseAP(kind="body")
        >>> pose = torch.rand(1, 17, 3) * 100
        >>> pose[..., 2] = 2
        >>> metric.update([{"keypoints": pose, "scores": torch.ones(1)}], [{"keypoints": pose}])
        >>> round(float(metric.compute()["ap"]), 3)
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, kind: Literal["body", "hand"] = "body", gt_area: GtArea = "labelled", **kwargs
    ):
        super().__init__(**kwargs)
        if kind not in SIGMAS:
            raise ValueError(f"kind={kind!r}: choose one of {sorted(SIGMAS)}")
        if gt_area not in ("labelled", "humansd_code"):
            raise ValueError(f"gt_area={gt_area!r}: choose 'labelled' or 'humansd_code'")
        self.kind = kind
        self.gt_area = gt_area
        self.sigmas = SIGMAS[kind]
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self._seen = 0

    def update(self, preds: list[dict], target: list[dict], image_ids=None) -> None:
        if len(preds) != len(target):
            raise ValueError(f"{len(preds)} predictions for {len(target)} targets")
        k = len(self.sigmas)
        if image_ids is None:
            rank, world = 0, 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            image_ids = [(self._seen + i) * world + rank for i in range(len(preds))]
        self._seen += len(preds)
        ids = torch.as_tensor(image_ids, dtype=torch.long, device=self.device).reshape(-1)
        pk, ps, pi, tk, ta, ti = [], [], [], [], [], []
        for image_id, pred, tgt in zip(ids, preds, target, strict=True):
            kp = torch.as_tensor(pred["keypoints"], dtype=torch.float64, device=self.device)
            kp = kp.reshape(-1, k, 3)
            pk.append(kp)
            ps.append(
                torch.as_tensor(pred["scores"], dtype=torch.float64, device=self.device).reshape(-1)
            )
            pi.append(image_id.repeat(len(kp)))
            t = torch.as_tensor(tgt["keypoints"], dtype=torch.float64, device=self.device)
            t = t.reshape(-1, k, 3)
            tk.append(t)
            areas = tgt.get("areas")
            ta.append(
                torch.zeros(len(t), dtype=torch.float64, device=self.device)
                if areas is None
                else torch.as_tensor(areas, dtype=torch.float64, device=self.device).reshape(-1)
            )
            ti.append(image_id.repeat(len(t)))
        # one tensor per update keeps the list states short (one all-gather each under DDP)
        self.pred_keypoints.append(torch.cat(pk))
        self.pred_scores.append(torch.cat(ps))
        self.pred_image.append(torch.cat(pi))
        self.target_keypoints.append(torch.cat(tk))
        self.target_areas.append(torch.cat(ta))
        self.target_image.append(torch.cat(ti))
        self.image_ids.append(ids)

    def compute(self) -> dict[str, torch.Tensor]:
        numpy = {name: dim_zero_cat(getattr(self, name)).cpu().numpy() for name in _STATES}
        image_ids = np.unique(numpy["image_ids"])
        if len(image_ids) != len(numpy["image_ids"]):
            raise ValueError("PoseAP: image_ids repeat; give ids unique across all updates")
        gt = coco_ground_truth(
            image_ids,
            numpy["target_image"],
            numpy["target_keypoints"],
            numpy["target_areas"],
            self.gt_area,
        )
        dt = coco_detections(gt, numpy["pred_image"], numpy["pred_keypoints"], numpy["pred_scores"])
        oks = COCOeval(gt, dt, "keypoints")
        oks.params.kpt_oks_sigmas = self.sigmas
        results = {}
        for prefix, evaluator in (("ap", oks), ("cap", _CosineSimilarityEval(gt, dt, self.sigmas))):
            stats = _stats(evaluator)
            for suffix, value in zip(STAT_NAMES, stats[:5], strict=True):
                results[prefix + suffix] = float(value)
        given = np.array([len(gt.getAnnIds(imgIds=[int(i)])) for i in image_ids])
        detected = np.array([(numpy["pred_image"] == i).sum() for i in image_ids])
        results["pce"] = float(np.abs(given - detected).mean())
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in results.items()}
