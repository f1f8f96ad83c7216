"""The two-stage method of "Giving a Hand to Diffusion Models": generate each hand and its
mask (stage 1), paste them onto a canvas aligned with the full-body pose, outpaint the body
around them with blending (stage 2)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torchvision.utils import save_image

from datamodules.canvas import align_hand, paste_hands
from datamodules.full_body_datamodule import FullBodyConfig
from datamodules.hand_crops import HandCropConfig, crop_box, hand_condition
from datamodules.rendering import hull_mask, render_full_skeleton
from datamodules.schema import Person
from lightning_modules.blending import BlendConfig
from lightning_modules.hand_generator import HandGenerator
from lightning_modules.outpainter import Outpainter
from lightning_modules.predictor import (
    ExperimentLoader,
    GenerationPredictor,
    inside,
    read_reports,
    save_png,
    seeds_for,
)
from metrics.hand_pose import keypoint_errors, match_hands
from pose_estimation import MediaPipePeople, PoseEstimator
from pose_estimation.keypoints import keypoint_extent

MaskSource = Literal["auto", "predicted", "keypoint_hull"]


@dataclass
class HandPlan:
    image: int  # index in the batch
    side: str  # "left" | "right"
    keypoints: np.ndarray  # [21, 3] in image pixels
    crop_keypoints: np.ndarray  # [21, 3] in hand-crop pixels
    seed: int


@dataclass
class ImageReport:
    hands_generated: list[str] = field(default_factory=list)
    hands_skipped: list[dict] = field(default_factory=list)  # {"side", "reason"}
    # per generated hand: {"side", "detected", "error_px", "error_rel", "detected_side"}
    hand_checks: list[dict] = field(default_factory=list)


def plan_hands(
    people: list[list[Person]], crop: HandCropConfig, min_hand_size: float, seeds: list[int]
) -> tuple[list[HandPlan], list[ImageReport]]:
    """Which hands stage 1 generates, and why the others are not (reported per image)."""
    plans, reports = [], [ImageReport() for _ in people]
    for i, image_people in enumerate(people):
        for person in image_people:
            for side, kp in (("left", person.left_hand), ("right", person.right_hand)):
                if kp is None:
                    continue
                labelled = int((kp[:, 2] > 0).sum())
                if labelled < max(crop.min_visible_keypoints, 2):
                    reports[i].hands_skipped.append(
                        {"side": side, "reason": f"{labelled} labelled keypoints"}
                    )
                    continue
                extent = keypoint_extent(kp)
                if extent < min_hand_size:
                    reports[i].hands_skipped.append(
                        {"side": side, "reason": f"too small ({extent:.1f} px < {min_hand_size})"}
                    )
                    continue
                x0, y0, side_px = crop_box(kp, crop.margin, 1)
                crop_kp = kp.copy()
                crop_kp[:, :2] = (kp[:, :2] - (x0, y0)) * (crop.resolution / side_px)
                # seeded per image and hand, independent of the rest of the batch
                seed = seeds[i] * 100 + len(reports[i].hands_generated)
                plans.append(HandPlan(i, side, kp, crop_kp, seed))
                reports[i].hands_generated.append(side)
    return plans, reports


def check_hands(detector: PoseEstimator, images: torch.Tensor, plans: list[HandPlan]) -> list[dict]:
    """Stage 1's own accuracy: a hand detector on each generated hand ``[N, 3, r, r]`` in
    [0, 1]; per hand, the mean distance (crop px and as a fraction of the hand's size, the
    longest side of its keypoint box) between the detected keypoints and the conditioning
    keypoints, over those labelled, and the side the detector sees (its ``"sides"``). A hand
    counts as detected as in :class:`~metrics.hand_pose.HandPoseAccuracy`: matched within one
    hand size (:func:`~metrics.hand_pose.match_hands`)."""
    checks = []
    for plan, found in zip(plans, detector.estimate(images), strict=True):
        given = plan.crop_keypoints
        detected = found["keypoints"].double().numpy().reshape(-1, 21, 3)
        check = {"side": plan.side, "detected": False, "error_px": None, "error_rel": None,
                 "detected_side": None}  # fmt: skip
        matches = match_hands(detected, given[None])
        if matches:
            d = matches[0][0]
            errors, size = keypoint_errors(detected[d], given)
            error = float(errors.mean())
            check.update(detected=True, error_px=error, error_rel=error / max(size, 1e-6))
            if "sides" in found:
                check["detected_side"] = found["sides"][d]
        checks.append(check)
    return checks


def add_hand_checks(reports: list[ImageReport], plans: list[HandPlan], checks: list[dict]):
    """File each hand's check under its image's report."""
    for plan, check in zip(plans, checks, strict=True):
        reports[plan.image].hand_checks.append(check)


def summarise_checks(checks: list[dict]) -> dict[str, float]:
    """Aggregate of :func:`check_hands` records: detection rate, mean errors over detected
    hands, and the fraction of detected hands whose side the detector agrees with."""
    if not checks:
        return {}
    found = [c for c in checks if c["detected"]]
    out = {"stage1_detection_rate": len(found) / len(checks), "stage1_hands": len(checks)}
    if found:
        out["stage1_error_px"] = float(np.mean([c["error_px"] for c in found]))
        out["stage1_error_rel"] = float(np.mean([c["error_rel"] for c in found]))
        sided = [c for c in found if c["detected_side"] is not None]
        if sided:
            agree = sum(c["detected_side"] == c["side"] for c in sided)
            out["stage1_side_agreement"] = agree / len(sided)
    return out


def resolve_mask_source(source: MaskSource, hand_generator: HandGenerator) -> str:
    """``auto``: the generator's mask head when it was trained (lambda > 0), else the keypoint
    hull. ``predicted`` with lambda = 0 is refused: that head never got a gradient, stays at
    its zero initialisation and predicts sigma(0) = 0.5 everywhere."""
    trained = hand_generator.mask_loss_weight > 0
    if source == "auto":
        return "predicted" if trained else "keypoint_hull"
    if source == "predicted" and not trained:
        raise ValueError(
            "hand_mask='predicted' but the hand generator was trained with mask_loss_weight=0: "
            "its mask head is untrained; use hand_mask='keypoint_hull' (or 'auto')"
        )
    return source


class TwoStagePipeline:
    """Full-body poses + prompts -> images, with the intermediate products.

    ``crop`` must be the hand crop settings the hand generator was trained with and ``body``
    the full-body settings of the outpainter (both are read from the training configs by
    :class:`TwoStagePredictor`). Hands smaller than ``min_hand_size`` px, or with too few
    labelled keypoints, are not generated: the body is outpainted without them and the
    report says so. Every image has its own seed (``seeds[i]``), so results do not depend on
    batch composition or on the number of processes.

    ``hand_mask`` is where each pasted hand's mask comes from (:func:`resolve_mask_source`):
    the generator's mask head, or the convex hull of the conditioning keypoints, dilated as
    the training crops' masks are. ``hand_detector`` (optional) checks each generated hand
    against its conditioning keypoints (:func:`check_hands`).
    """

    def __init__(
        self,
        hand_generator: HandGenerator,
        outpainter: Outpainter,
        crop: HandCropConfig,
        body: FullBodyConfig,
        min_hand_size: float = 16.0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        blend: BlendConfig | None = None,
        hand_mask: MaskSource = "auto",
        hand_detector: PoseEstimator | None = None,
    ):
        self.hand_generator = hand_generator
        self.outpainter = outpainter
        self.crop = crop
        self.body = body
        self.min_hand_size = min_hand_size
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.blend = blend
        self.hand_mask = resolve_mask_source(hand_mask, hand_generator)
        self.hand_detector = hand_detector

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    def generate_hands(
        self, plans: list[HandPlan], prompts: list[str], **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1 for every planned hand: images ``[N, 3, r, r]`` and masks ``[N, 1, r, r]``
        in [0, 1] (the predicted or the keypoint-hull mask, as ``hand_mask`` says)."""
        r = self.crop.resolution
        if not plans:
            return torch.zeros(0, 3, r, r), torch.zeros(0, 1, r, r)
        skeletons, captions = [], []
        for p in plans:
            skeleton, caption = hand_condition(
                p.crop_keypoints, p.side == "right", prompts[p.image], self.crop
            )
            skeletons.append(torch.from_numpy(skeleton).permute(2, 0, 1).float() / 255)
            captions.append(caption)
        images, masks = self.hand_generator.sample(
            torch.stack(skeletons),
            captions,
            generator=self._generators([p.seed for p in plans]),
            **kwargs,
        )
        if self.hand_mask == "keypoint_hull":
            masks = torch.stack([
                torch.from_numpy(hull_mask(p.crop_keypoints, (r, r), self.crop.hull_dilation))
                for p in plans
            ])[:, None].float() / 255  # fmt: skip
        return images.cpu(), masks.cpu()

    @torch.no_grad()
    def __call__(self, people: list[list[Person]], prompts: list[str], seeds: list[int]) -> dict:
        """``people`` in pixels of the ``body.resolution`` square. Returns ``images``
        ``[B, 3, R, R]``, ``canvases`` ``[B, 3, R, R]`` and ``known_masks`` ``[B, 1, R, R]`` in
        [0, 1], ``hand_images``/``hand_masks`` ``[N, ., r, r]`` for the N generated hands,
        their ``plans`` and ``hand_owner`` (image index of each hand), the ``seeds`` and one
        :class:`ImageReport` per image."""
        res = self.body.resolution
        plans, reports = plan_hands(people, self.crop, self.min_hand_size, seeds)
        kw = dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)
        hand_images, hand_masks = self.generate_hands(plans, prompts, **kw)
        if self.hand_detector is not None:
            add_hand_checks(reports, plans, check_hands(self.hand_detector, hand_images, plans))
        canvases, known = [], []
        for i in range(len(people)):
            pasted = [
                (
                    hand_images[n].permute(1, 2, 0).numpy(),
                    hand_masks[n, 0].numpy(),
                    align_hand(plan.crop_keypoints, plan.keypoints),
                )
                for n, plan in enumerate(plans)
                if plan.image == i
            ]
            canvas, mask = paste_hands((res, res), pasted)
            canvases.append(torch.from_numpy(canvas).permute(2, 0, 1))
            known.append(torch.from_numpy(mask)[None])
        canvases, known = torch.stack(canvases), torch.stack(known)
        skeletons = torch.stack([
            torch.from_numpy(render_full_skeleton(
                p, (res, res), self.body.body_line_width, self.body.hand_line_width,
                self.body.skeleton_layout, self.body.draw_hands,
            )).permute(2, 0, 1).float() / 255
            for p in people
        ])  # fmt: skip
        images = self.outpainter.sample(
            skeletons,
            (canvases * 2 - 1) * known,
            known,
            prompts,
            generator=self._generators(seeds),
            blend=self.blend,
            **kw,
        )
        return {
            "images": images.cpu(), "skeletons": skeletons, "canvases": canvases,
            "known_masks": known, "hand_images": hand_images, "hand_masks": hand_masks,
            "plans": plans, "hand_owner": [p.image for p in plans], "seeds": seeds,
            "reports": reports,
        }  # fmt: skip


class TwoStagePredictor(GenerationPredictor):
    """``trainer.predict`` wrapper: loads both stages from their experiment configs and
    checkpoints (``last`` = the newest of the config's run), runs :class:`TwoStagePipeline` on
    :class:`~datamodules.pose_datamodule.PoseDataModule` batches and writes, per sample key,
    ``<out_dir>/<key>.png`` and ``<out_dir>/intermediate/<key>_{skeleton,canvas,hands}.png``,
    plus one JSON line per image appended to ``<out_dir>/report-rank<r>.jsonl`` (no two ranks
    share a file). The seed of an image is ``seed`` + a stable hash of its key.

    ``check_hands`` runs MediaPipe Hands (the offline detector shipped with mediapipe) on each
    generated hand, after the timed sampling call; :meth:`summary` aggregates the checks of
    every rank's report."""

    def __init__(
        self,
        hand_config: str,
        outpaint_config: str,
        hand_ckpt: str | None = "last",
        outpaint_ckpt: str | None = "last",
        out_dir: str = "results/two_stage",
        min_hand_size: float = 16.0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        blend: BlendConfig | dict | None = None,
        hand_mask: MaskSource = "auto",
        check_hands: bool = True,
        seed: int = 0,
        load_experiment: ExperimentLoader | None = None,
    ):
        super().__init__(out_dir, seed, load_experiment)
        self.hand_generator, hand_cfg = self.load(hand_config, hand_ckpt)
        self.outpainter, outpaint_cfg = self.load(outpaint_config, outpaint_ckpt)
        crop = HandCropConfig(**(hand_cfg["data"]["params"].get("crop") or {}))
        body = FullBodyConfig(**(outpaint_cfg["data"]["params"].get("body") or {}))
        if blend is not None and not isinstance(blend, BlendConfig):
            blend = BlendConfig(**blend)
        self.pipeline = TwoStagePipeline(
            self.hand_generator,
            self.outpainter,
            crop,
            body,
            min_hand_size,
            num_inference_steps,
            guidance_scale,
            blend,
            hand_mask,
        )
        # a small confidence: generated hands at crop size are judged, not found in a scene
        self.hand_detector = (
            MediaPipePeople(part="hands", detect_bodies=False, max_num_hands=2, min_hand_score=0.3)
            if check_hands
            else None
        )
        self.resolution = body.resolution
        self.settings = {"hand_mask": self.pipeline.hand_mask}

    def summary(self) -> dict[str, float]:
        """Timings plus the aggregated stage-1 hand checks of every rank's report."""
        checks = [
            check
            for record in read_reports(self.out_dir)
            for check in record.get("hand_checks", [])
        ]
        return {**super().summary(), **summarise_checks(checks)}

    def sample_batch(self, batch: dict) -> dict:
        return self.pipeline(batch["people"], batch["caption"], seeds_for(batch["key"], self.seed))

    def write_outputs(self, batch: dict, out: dict) -> None:
        if self.hand_detector is not None:
            checks = check_hands(self.hand_detector, out["hand_images"], out["plans"])
            add_hand_checks(out["reports"], out["plans"], checks)
        seeds = out["seeds"]
        inter = self.out_dir / "intermediate"
        inter.mkdir(parents=True, exist_ok=True)
        report_file = self.out_dir / f"report-rank{self.global_rank}.jsonl"
        with report_file.open("a") as reports:
            for i, key in enumerate(batch["key"]):
                save_image(out["skeletons"][i], inside(inter, f"{key}_skeleton.png"))
                # as the outpainter sees it: the pasted hands, grey (0 in [-1, 1]) elsewhere
                seen = (out["canvases"][i] * 2 - 1) * out["known_masks"][i].to(out["canvases"])
                save_image((seen + 1) / 2, inside(inter, f"{key}_canvas.png"))
                hands = [n for n, owner in enumerate(out["hand_owner"]) if owner == i]
                if hands:
                    pairs = torch.cat(
                        [
                            torch.cat(
                                [out["hand_images"][n], out["hand_masks"][n].expand(3, -1, -1)], -1
                            )
                            for n in hands
                        ],
                        -2,
                    )
                    save_image(pairs, inside(inter, f"{key}_hands.png"))
                record = {
                    "key": key,
                    "caption": batch["caption"][i],
                    "seed": seeds[i],
                    "hand_mask": self.pipeline.hand_mask,
                    **asdict(out["reports"][i]),
                }
                reports.write(json.dumps(record) + "\n")
                # the image last: its presence marks the sample done for a resumed run
                save_png(out["images"][i], inside(self.out_dir, f"{key}.png"))
