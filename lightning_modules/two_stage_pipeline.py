"""The two-stage method of "Giving a Hand to Diffusion Models": generate each hand and its
mask (stage 1), paste them onto a canvas aligned with the full-body pose, outpaint the body
around them with blending (stage 2)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torchvision.utils import save_image

from datamodules.canvas import align_hand, paste_hands
from datamodules.full_body_datamodule import FullBodyConfig
from datamodules.hand_crops import HandCropConfig, crop_box
from datamodules.rendering import render_full_skeleton, render_hand_skeleton
from datamodules.schema import Person
from lightning_modules.blending import BlendConfig
from lightning_modules.hand_generator import HandGenerator
from lightning_modules.outpainter import Outpainter
from lightning_modules.predictor import GenerationPredictor, save_png, seeds_for


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
    alignment_rms_px: list[float] = field(default_factory=list)


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
                labelled = kp[kp[:, 2] > 0, :2]
                if len(labelled) < max(crop.min_visible_keypoints, 2):
                    reports[i].hands_skipped.append(
                        {"side": side, "reason": f"{len(labelled)} labelled keypoints"}
                    )
                    continue
                extent = float((labelled.max(0) - labelled.min(0)).max())
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


class TwoStagePipeline:
    """Full-body poses + prompts -> images, with the intermediate products.

    ``crop`` must be the hand crop settings the hand generator was trained with and ``body``
    the full-body settings of the outpainter (both are read from the training configs by
    :class:`TwoStagePredictor`). Hands smaller than ``min_hand_size`` px, or with too few
    labelled keypoints, are not generated: the body is outpainted without them and the
    report says so. Every image has its own seed (``seeds[i]``), so results do not depend on
    batch composition or on the number of processes.
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
    ):
        self.hand_generator = hand_generator
        self.outpainter = outpainter
        self.crop = crop
        self.body = body
        self.min_hand_size = min_hand_size
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.blend = blend

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    @torch.no_grad()
    def __call__(self, people: list[list[Person]], prompts: list[str], seeds: list[int]) -> dict:
        """``people`` in pixels of the ``body.resolution`` square. Returns ``images``
        ``[B, 3, R, R]``, ``canvases`` ``[B, 3, R, R]`` and ``known_masks`` ``[B, 1, R, R]`` in
        [0, 1], ``hand_images``/``hand_masks`` ``[N, ., r, r]`` for the N generated hands,
        ``hand_owner`` (image index of each hand) and one :class:`ImageReport` per image."""
        res = self.body.resolution
        plans, reports = plan_hands(people, self.crop, self.min_hand_size, seeds)
        kw = dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)
        hand_images = torch.zeros(0, 3, self.crop.resolution, self.crop.resolution)
        hand_masks = torch.zeros(0, 1, self.crop.resolution, self.crop.resolution)
        if plans:
            skeletons = torch.stack([
                torch.from_numpy(render_hand_skeleton(
                    p.crop_keypoints, self.crop.resolution, self.crop.line_width,
                    self.crop.joint_radius)).permute(2, 0, 1).float() / 255
                for p in plans
            ])  # fmt: skip
            hand_images, hand_masks = self.hand_generator.sample(
                skeletons,
                [prompts[p.image] for p in plans],
                generator=self._generators([p.seed for p in plans]),
                **kw,
            )
            hand_images, hand_masks = hand_images.cpu(), hand_masks.cpu()
        canvases, known = [], []
        for i in range(len(people)):
            pasted = []
            for n, plan in enumerate(plans):
                if plan.image != i:
                    continue
                alignment = align_hand(plan.crop_keypoints, plan.keypoints)
                reports[i].alignment_rms_px.append(alignment.rms_error)
                pasted.append(
                    (hand_images[n].permute(1, 2, 0).numpy(), hand_masks[n, 0].numpy(), alignment)
                )
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
            "hand_owner": [p.image for p in plans], "reports": reports,
        }  # fmt: skip


class TwoStagePredictor(GenerationPredictor):
    """``trainer.predict`` wrapper: loads both stages from their experiment configs and
    checkpoints (``last`` = the newest of the config's run), runs :class:`TwoStagePipeline` on
    :class:`~datamodules.pose_datamodule.PoseDataModule` batches and writes, per sample key,
    ``<out_dir>/<key>.png`` and ``<out_dir>/intermediate/<key>_{skeleton,canvas,hands}.png``,
    plus one JSON line per image appended to ``<out_dir>/report-rank<r>.jsonl`` (no two ranks
    share a file). The seed of an image is ``seed`` + a stable hash of its key."""

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
        seed: int = 0,
    ):
        super().__init__(out_dir, seed)
        from experiments.run import load_module

        self.hand_generator, hand_cfg = load_module(hand_config, hand_ckpt)
        self.outpainter, outpaint_cfg = load_module(outpaint_config, outpaint_ckpt)
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
        )
        self.resolution = body.resolution

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        seeds = seeds_for(batch["key"], self.seed)
        with self.timed(len(batch["key"])):
            out = self.pipeline(batch["people"], batch["caption"], seeds)
        inter = self.out_dir / "intermediate"
        inter.mkdir(parents=True, exist_ok=True)
        report_file = self.out_dir / f"report-rank{self.global_rank}.jsonl"
        with report_file.open("a") as reports:
            for i, key in enumerate(batch["key"]):
                save_image(out["skeletons"][i], inter / f"{key}_skeleton.png")
                save_image(out["canvases"][i], inter / f"{key}_canvas.png")
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
                    save_image(pairs, inter / f"{key}_hands.png")
                record = {
                    "key": key,
                    "caption": batch["caption"][i],
                    "seed": seeds[i],
                    **asdict(out["reports"][i]),
                }
                reports.write(json.dumps(record) + "\n")
                # the image last: its presence marks the sample done for a resumed run
                save_png(out["images"][i], self.out_dir / f"{key}.png")
