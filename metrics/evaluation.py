"""The evaluation LightningModule: every metric over generated vs real images, under DDP.

``trainer.test(Evaluator(...), datamodule=EvaluationDataModule(...))``: each rank runs the pose
estimators, CLIP and the FID/KID feature network on its share of the images and only updates
metric states; at the end every rank computes the metrics from the synced states, and rank 0
writes ``results.json`` and ``results.md`` to ``results_dir``. TensorBoard gets the scalars.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import open_clip
import torch
import torchmetrics

from metrics.clip_sim import CLIPSim
from metrics.fid_kid import FID, KID, CategoryFIDKID
from metrics.hand_fid import HandFIDKID
from metrics.hand_pose import HandPoseAccuracy
from metrics.pose_ap import GtArea, PoseAP

# (key, higher is better, scale for the table): the table shows AP-like values x 100 and
# KID x 10, as HumanSD's Table 1 does, headed "100·ap", "10·kid_mean".
COLUMNS = (
    ("fid", False, 1), ("kid_mean", False, 10), ("fid_category_mean", False, 1),
    ("kid_category_mean", False, 10), ("ap", True, 100), ("ap_m", True, 100),
    ("cap", True, 100), ("pce", False, 1), ("clipsim", True, 1), ("fid_h", False, 1),
    ("kid_h_mean", False, 10), ("pck@0.2", True, 100), ("hand_mpjpe", False, 100),
    ("hand_mpjpe_px", False, 1), ("detection_rate", True, 100), ("hand_confidence", True, 100),
    ("stage1_detection_rate", True, 100),
    ("stage1_error_rel", False, 100), ("refiner_detected_before", True, 100),
    ("refiner_detected_after", True, 100), ("refiner_error_before_px", False, 1),
    ("refiner_error_after_px", False, 1), ("seconds_per_image", False, 1),
    ("seconds_per_image_batch1", False, 1),
)  # fmt: skip

MEDIAPIPE_BODY = {"target": "pose_estimation.MediaPipePeople", "params": {"part": "body"}}
MEDIAPIPE_HANDS = {"target": "pose_estimation.MediaPipePeople", "params": {"part": "hands"}}


def format_value(value: float) -> str:
    """Two decimals, as papers print them; three significant digits below 0.1 (tiny models
    and random feature nets give small FIDs that two decimals would round to 0).

    >>> format_value(12.345), format_value(0.0123456), format_value(0.0)
    ('12.35', '0.0123', '0.00')
    """
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.1 else f"{value:.3g}"


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """Methods x metrics, the direction of each metric in the header; a column headed
    ``100·ap`` shows 100 times the value ``results.json`` holds for ``ap`` (a footnote says so)."""
    present = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]
    header = ["method"] + [
        f"{str(scale) + '·' if scale != 1 else ''}{key} {'↑' if up else '↓'}"
        for key, up, scale in present
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, values in rows.items():
        # COCOeval's -1 means "no ground truth in this area range", NaN "nothing to measure"
        cells = [
            format_value(values[k] * s)
            if k in values and not (s == 100 and values[k] < 0) and not math.isnan(values[k])
            else "–"
            for k, _, s in present
        ]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    scaled = [f"{s}·{k}" for k, _, s in present if s != 1]
    if scaled:
        lines.append(
            f"\n{', '.join(scaled)}: the value times the factor (results.json holds the values)."
        )
    return "\n".join(lines) + "\n"


class Evaluator(L.LightningModule):
    """FID, KID, CLIPSIM, body pose AP/CAP/PCE and hand pose accuracy of one method.

    Test dataloader 0 yields generated images with their conditions, dataloader 1 real images
    (see ``datamodules.evaluation_datamodule``). Estimators and feature networks are
    ``target``/``params`` configs, built by ``build_node`` (the experiments layer hands in
    its builder); ``feature_extractor: null`` means the standard Inception
    (weights from ``inception_weights`` or torch's cache), ``clip_model: null`` OpenAI CLIP
    ``clip_model_name``/``clip_pretrained`` through open_clip. Set an estimator to null to skip
    its metrics.

    ``per_category``: FID and KID also per ``source.category`` of the samples (Human-Art's
    scenes) and their mean over categories, as HumanSD's Table 1 reports them, beside the
    pooled values over all images (``fid_category_mean``, ``kid_category_mean``; each
    category's values in ``results.json`` under ``per_category``). ``gt_area``: the body AP's
    OKS scale (:class:`~metrics.pose_ap.PoseAP`): ``labelled`` (the box of the labelled
    keypoints, default) or ``humansd_code`` (HumanSD's released evaluation code).
    ``hand_fid``: FID-H and KID-H on hand crops (:class:`~metrics.hand_fid.HandFIDKID`: real
    images at their labelled hands, generated ones at their conditioning hands), sharing the
    Inception network of FID.
    """

    def __init__(
        self,
        results_dir: str = "results/eval",
        method: str = "generated",
        body_estimator: dict | None = MEDIAPIPE_BODY,
        hand_estimator: dict | None = MEDIAPIPE_HANDS,
        feature_extractor: dict | None = None,
        inception_weights: str | None = None,
        antialias: bool = True,
        clip_model: dict | None = None,
        clip_model_name: str = "ViT-B-16",
        clip_pretrained: str = "openai",
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        per_category: bool = False,
        gt_area: GtArea = "labelled",
        hand_fid: bool = True,
        seed: int = 0,
        build_node: Callable[[dict], object] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["build_node"])
        nodes = [feature_extractor, clip_model, body_estimator, hand_estimator]
        if build_node is None and any(nodes):
            raise ValueError(
                "Evaluator builds its networks through build_node (experiments passes it)"
            )
        extractor = build_node(feature_extractor) if feature_extractor else None
        self.fid = FID(extractor, inception_weights, antialias)
        self.kid = KID(
            extractor, kid_subsets, kid_subset_size, inception_weights, antialias, seed=seed
        )
        self.hand_fid = (
            HandFIDKID(self.fid.inception.extractor, kid_subsets, kid_subset_size, seed=seed)
            if hand_fid
            else None
        )
        self.categories = (
            CategoryFIDKID(kid_subsets, kid_subset_size, seed=seed) if per_category else None
        )
        if clip_model:
            self.clip = CLIPSim(build_node(clip_model), open_clip.get_tokenizer(clip_model_name))
        else:
            self.clip = CLIPSim(model_name=clip_model_name, pretrained=clip_pretrained)
        self.body_estimator = build_node(body_estimator) if body_estimator else None
        self.hand_estimator = build_node(hand_estimator) if hand_estimator else None
        self.pose = PoseAP(kind="body", gt_area=gt_area)
        self.hands = HandPoseAccuracy()
        self.results: dict[str, float] = {}  # of the last test run, on every rank

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        images = batch["image"]
        real = dataloader_idx == 1
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)
        if self.hand_fid is not None:
            self.hand_fid.update(images, batch["hands"], real)
        if self.categories is not None:
            self.categories.update(self.fid.inception(images), real, batch["category"])
        if real:
            return
        self.clip.update(images, batch["caption"])
        if self.body_estimator is not None:
            preds = self.body_estimator.estimate(images)
            self.pose.update(preds, [{"keypoints": b} for b in batch["body"]], batch["id"])
        if self.hand_estimator is not None:
            preds = self.hand_estimator.estimate(images)
            targets = [
                {"keypoints": h, "areas": a}
                for h, a in zip(batch["hands"], batch["hand_areas"], strict=True)
            ]
            self.hands.update(preds, targets, batch["id"])

    def compute_results(self) -> dict[str, float]:
        """Every metric from the synced states (call on every rank: it all-gathers)."""
        n_real = int(self.fid.real_features_num_samples)
        n_fake = int(self.fid.fake_features_num_samples)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = torch.tensor([n_real, n_fake], device=self.device)
            torch.distributed.all_reduce(counts)
            n_real, n_fake = counts.tolist()
        self.kid.subset_size = min(self.hparams.kid_subset_size, n_real, n_fake)
        results = {"fid": self.fid.compute()}
        results["kid_mean"], results["kid_std"] = self.kid.compute()
        results["clipsim"] = self.clip.compute()
        if self.hand_fid is not None:
            results.update(self.hand_fid.compute())
        per_category = {}
        if self.categories is not None:
            by_category = self.categories.compute()
            per_category = {"fid": by_category.pop("fid"), "kid": by_category.pop("kid")}
            results.update(by_category)
        if self.body_estimator is not None:
            results.update(self.pose.compute())
        if self.hand_estimator is not None:
            results.update(self.hands.compute())
        out = {k: float(v) for k, v in results.items()}
        out.update(n_generated=n_fake, n_real=n_real, kid_subset_size=self.kid.subset_size)
        if per_category:
            out["per_category"] = per_category
        return out

    def on_test_epoch_end(self) -> None:
        results = self.results = self.compute_results()
        scalars = {f"eval/{k}": v for k, v in results.items() if not isinstance(v, dict)}
        self.log_dict(scalars, rank_zero_only=True)
        if self.trainer.is_global_zero:
            self.write_results(results)

    def settings(self) -> dict:
        extractor = self.fid.inception.extractor
        return {
            "feature_extractor": type(extractor).__qualname__,
            "feature_dim": int(getattr(extractor, "num_features", -1)),
            "antialias": self.hparams.antialias,
            "clip": self.hparams.clip_model
            or f"{self.hparams.clip_model_name}/{self.hparams.clip_pretrained}",
            "body_estimator": self.hparams.body_estimator,
            "hand_estimator": self.hparams.hand_estimator,
            "gt_area": self.hparams.gt_area,
            "per_category": self.hparams.per_category,
            "world_size": self.trainer.world_size,
            "torchmetrics": torchmetrics.__version__,
        }

    def write_results(self, results: dict[str, float]) -> Path:
        out = Path(self.hparams.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"method": self.hparams.method, "results": results, "settings": self.settings()}
        (out / "results.json").write_text(json.dumps(record, indent=2))
        (out / "results.md").write_text(markdown_table({self.hparams.method: results}))
        return out
