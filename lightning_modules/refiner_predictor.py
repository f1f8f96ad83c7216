"""``trainer.predict`` for HandRefiner: repair the hands of another method's images (a
post-step: "two-stage + HandRefiner") or of the evaluation set's real photos (the refiner on
its own), with a report per hand and the hand keypoint error before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image

from datamodules.pose_datamodule import PoseDataModule
from datamodules.refiner_datamodule import RefinerDataConfig, people_hand_depths
from datamodules.schema import Person
from lightning_modules.hand_refiner import ADAPTIVE_STRENGTHS
from lightning_modules.predictor import (
    ExperimentLoader,
    GenerationPredictor,
    inside,
    read_reports,
    save_png,
)
from metrics.hand_pose import keypoint_errors, match_hands
from pose_estimation.hand_depth import HandDepth, LandmarkHandDepth, combine_hands
from pose_estimation.mediapipe_people import MediaPipePeople

DepthSource = Literal["pose", "landmarks", "mesh"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# the release keeps the first strength whose error is below this factor x the error at 1.0
ADAPTIVE_TOLERANCE = 1.15


def scaled_people(people: list[Person], sx: float, sy: float) -> list[Person]:
    """Keypoints scaled from the letterbox square to an image ``sx``/``sy`` times its size."""

    def scale(kp):
        if kp is None:
            return None
        out = kp.copy()
        out[:, 0] *= sx
        out[:, 1] *= sy
        return out

    return [Person(p.bbox, scale(p.body), scale(p.left_hand), scale(p.right_hand)) for p in people]


def given_hands(people: list[Person]) -> np.ndarray:
    """The labelled hands of ``people`` ``[M, 21, 3]`` (x, y, visibility)."""
    hands = [
        kp for p in people for kp in (p.left_hand, p.right_hand)
        if kp is not None and (kp[:, 2] > 0).any()
    ]  # fmt: skip
    return np.array(hands, np.float64).reshape(-1, 21, 3)


def hand_errors(found: dict, given: np.ndarray) -> tuple[list[float], int]:
    """Mean keypoint distance (px) of each given hand ``[M, 21, 3]`` a detector found (one
    image's ``estimate`` output, matched within one hand size) and the number found."""
    detected = found["keypoints"].double().numpy().reshape(-1, 21, 3)
    errors = [float(keypoint_errors(detected[d], given[g])[0].mean())
              for d, g in match_hands(detected, given)]  # fmt: skip
    return errors, len(errors)


def target_keypoints(hand: HandDepth) -> np.ndarray:
    """The keypoints a hand's depth was drawn from ``[21, 3]`` (x, y, 1 if labelled else 0),
    what the adaptive strength measures the refined hand against."""
    valid = np.ones(21, bool) if hand.valid is None else hand.valid
    return np.concatenate([hand.keypoints[:, :2], valid[:, None].astype(float)], 1)


class RefinerPredictor(GenerationPredictor):
    """HandRefiner over images: ``base_images`` (a folder of ``<key>.png``, e.g. another
    method's evaluation images; the harness fills it from ``base_method``) or, with neither,
    the evaluation set's photos letterboxed to the refiner's training resolution.

    ``depth``: where each hand's depth and mask come from. ``pose``: the conditioning hand
    keypoints of the sample (where the hand should be; the schema being 2-D, all at z = 0);
    ``landmarks``: MediaPipe Hands on the image, with its relative z (the release's detection,
    HandRefiner's settings); ``mesh``: :class:`~pose_estimation.mesh_hand_depth.MeshHandDepth`
    (``depth_params``: its ``model``, ``faces``, ...). ``strength``: a control strength, or
    ``"adaptive"`` (the release's search over 1.0, 0.4, ..., 0.9 that keeps the first
    strength whose hand keypoint error is below 1.15 x the error at 1.0).

    Writes ``<key>.png`` (the input itself when no hand was refined), ``intermediate/<key>_
    depth_mask.png`` (depth | mask) and a JSON line per image in ``report-rank<r>.jsonl``: per
    hand refined / not detected / too small and why, the strength used and, with
    ``check_hands``, MediaPipe's hand keypoint error against the conditioning hands before
    and after (:meth:`summary` averages them).
    """

    def __init__(
        self,
        config: str,
        ckpt: str | None = "last",
        base_images: str | None = None,
        base_method: str | None = None,
        depth: DepthSource = "pose",
        depth_params: dict | None = None,
        strength: float | Literal["adaptive"] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        feather: float | None = None,
        min_padding: int | None = None,
        min_hand_size: float | None = None,
        check_hands: bool = True,
        out_dir: str = "results/refined",
        seed: int = 0,
        load_experiment: ExperimentLoader | None = None,
    ):
        super().__init__(out_dir, seed, load_experiment)
        self.refiner, cfg = self.load(config, ckpt)
        self.data = RefinerDataConfig(**(cfg["data"]["params"].get("refiner") or {}))
        # the refiner's training settings unless given (px of the refined images)
        if min_padding is not None:
            self.data.min_padding = min_padding
        if min_hand_size is not None:
            self.data.min_hand_size = min_hand_size
        self.resolution = self.data.resolution
        self.base_images = Path(base_images) if base_images else None
        self.base_method = base_method
        if depth not in ("pose", "landmarks", "mesh"):
            raise ValueError(f"depth={depth!r}: choose pose, landmarks or mesh")
        self.depth_source = depth
        params = dict(depth_params or {})
        if depth == "landmarks":
            params.setdefault("min_padding", self.data.min_padding)
            self.estimator = LandmarkHandDepth(**params)
        elif depth == "mesh":
            from pose_estimation.mesh_hand_depth import MeshHandDepth

            params.setdefault("min_padding", self.data.min_padding)
            self.estimator = MeshHandDepth(**params)
        else:
            self.estimator = None
        if isinstance(strength, str) and strength != "adaptive":
            raise ValueError(f"strength={strength!r}: a number or 'adaptive'")
        self.strength = strength
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.feather = feather
        # generated images are judged, as the two-stage check does: a small confidence
        self.hand_detector = (
            MediaPipePeople(part="hands", detect_bodies=False, max_num_hands=4, min_hand_score=0.3)
            if check_hands or strength == "adaptive"
            else None
        )
        self.check_hands = check_hands
        used = self.refiner.strength if strength is None else strength
        self.settings = {"depth": depth, "strength": str(used)}
        if base_method:
            self.settings["base"] = base_method

    def prediction_datamodule(self, shards, keys, batch_size, num_workers=0):
        """The samples' poses (and, without ``base_images``, their photos)."""
        return PoseDataModule(
            shards, self.resolution, batch_size, num_workers, keys, str(self.out_dir),
            with_image=self.base_images is None, captions=self.captions,
        )  # fmt: skip

    def inputs(self, batch: dict) -> tuple[list[np.ndarray], list[list[Person]]]:
        """The images to refine (``[H, W, 3]`` uint8) and each one's people in its pixels."""
        if self.base_images is None:
            return list(batch["image"]), list(batch["people"])
        images, people = [], []
        for key, persons in zip(batch["key"], batch["people"], strict=True):
            image = self.base_image(key)
            height, width = image.shape[:2]
            images.append(image)
            people.append(scaled_people(persons, width / self.resolution, height / self.resolution))
        return images, people

    def base_image(self, key: str) -> np.ndarray:
        """``<base_images>/<key>`` (.png, or .jpg/.jpeg/.webp) as RGB ``[H, W, 3]`` uint8."""
        files = [inside(self.base_images, key + suffix) for suffix in IMAGE_SUFFIXES]
        found = [f for f in files if f.is_file()]
        if not found:
            raise FileNotFoundError(
                f"base_images: {files[0]} is missing: generate the base method's images first"
                + (f" (methods.{self.base_method})" if self.base_method else "")
            )
        try:
            with Image.open(found[0]) as image:
                return np.asarray(image.convert("RGB"))
        except Exception as exc:  # PIL raises many types for unreadable files
            raise ValueError(f"base_images: {found[0]} is not a readable image ({exc})") from None

    def hands_of(self, image: np.ndarray, people: list[Person]) -> tuple[list[HandDepth], list]:
        """Depth and mask of every hand to refine and a report entry per hand."""
        height, width = image.shape[:2]
        if self.estimator is None:
            d = self.data
            hands, skipped = people_hand_depths(
                people, (width, height), d.min_padding, d.radius_fraction, d.min_keypoints,
                d.min_hand_size,
            )  # fmt: skip
            report = [{"side": h.side, "status": "refined"} for h in hands]
            return hands, report + [{**s, "status": "skipped"} for s in skipped]
        hands, report = [], []
        for hand in self.estimator(image):
            extent = float(np.ptp(hand.keypoints[:, :2], 0).max())
            entry = {"side": hand.side, "score": hand.score}
            if extent < self.data.min_hand_size:
                reason = f"too small ({extent:.1f} px < {self.data.min_hand_size})"
                report.append({**entry, "status": "skipped", "reason": reason})
            elif not hand.depth.any():  # the release gives up on such an image
                reason = "its depth map covers no pixel"
                report.append({**entry, "status": "depth failed", "reason": reason})
            else:
                hands.append(hand)
                report.append({**entry, "status": "refined"})
        found = len(report)
        expected = len(given_hands(people))
        if found < expected:
            report.append({
                "status": "not detected", "count": expected - found,
                "reason": f"{found} of {expected} conditioning hands detected",
            })  # fmt: skip
        elif not found:
            report.append({"status": "not detected", "reason": "no hand found in the image"})
        return hands, report

    def refine(self, images, depths, masks, prompts, keys, strength) -> torch.Tensor:
        return self.refiner.refine(
            images, depths, masks, prompts, strength=strength,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            generator=self.generators(keys), feather=self.feather,
        )  # fmt: skip

    def adaptive(self, images, depths, masks, prompts, keys, targets) -> tuple[torch.Tensor, list]:
        """The release's adaptive strength, per image: the error at 1.0 is the reference; the
        first later strength below 1.15 x it is kept, else 1.0 (an undetected hand counts as
        an infinite error). Every try uses the image's seed."""
        chosen = [None] * len(keys)
        out = None
        reference = [np.inf] * len(keys)
        for n, strength in enumerate(ADAPTIVE_STRENGTHS):
            pending = [i for i in range(len(keys)) if chosen[i] is None]
            if not pending:
                break
            refined = self.refine(
                images[pending], depths[pending], masks[pending], [prompts[i] for i in pending],
                [keys[i] for i in pending], strength,
            )  # fmt: skip
            if out is None:
                out = refined.clone()
            for j, (i, found) in enumerate(
                zip(pending, self.hand_detector.estimate(refined), strict=True)
            ):
                errors, _ = hand_errors(found, targets[i])
                error = float(np.mean(errors)) if len(errors) == len(targets[i]) else np.inf
                if n == 0:
                    reference[i] = error
                elif error < ADAPTIVE_TOLERANCE * reference[i]:
                    out[i], chosen[i] = refined[j], strength
        return out, [1.0 if c is None else c for c in chosen]

    def sample_batch(self, batch: dict) -> dict:
        images, people = self.inputs(batch)
        plans = [
            self.hands_of(image, persons) for image, persons in zip(images, people, strict=True)
        ]
        todo = [i for i, (hands, _) in enumerate(plans) if hands]
        outputs = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in images]
        depth_maps = [np.zeros(im.shape[:2]) for im in images]
        mask_maps = [np.zeros(im.shape[:2], bool) for im in images]
        strengths = [None] * len(images)
        # one refine call per image size (a batch's base images normally share one)
        by_size: dict[tuple, list[int]] = {}
        for i in todo:
            height, width = images[i].shape[:2]
            depth_maps[i], mask_maps[i] = combine_hands(plans[i][0], (width, height))
            by_size.setdefault((height, width), []).append(i)
        for group in by_size.values():
            x = torch.stack([outputs[i] for i in group])
            d = torch.stack([torch.from_numpy(depth_maps[i]).float()[None] for i in group])
            m = torch.stack([torch.from_numpy(mask_maps[i]).float()[None] for i in group])
            prompts = [batch["caption"][i] for i in group]
            keys = [batch["key"][i] for i in group]
            if self.strength == "adaptive":
                targets = [np.array([target_keypoints(h) for h in plans[i][0]]) for i in group]
                refined, used = self.adaptive(x, d, m, prompts, keys, targets)
            else:
                refined = self.refine(x, d, m, prompts, keys, self.strength)
                used = [self.refiner.strength if self.strength is None else self.strength] * len(
                    group
                )
            for j, i in enumerate(group):
                outputs[i], strengths[i] = refined[j].cpu(), used[j]
        return {
            "images": outputs, "inputs": images, "people": people, "depths": depth_maps,
            "masks": mask_maps, "reports": [report for _, report in plans],
            "strengths": strengths,
        }  # fmt: skip

    def hand_check(self, before: np.ndarray, after: torch.Tensor, people: list[Person]) -> dict:
        """MediaPipe's hand keypoint error (px) against the conditioning hands, before and
        after, and how many of them it found."""
        given = given_hands(people)
        if len(given) == 0:
            return {"hands": 0}
        pair = torch.stack([torch.from_numpy(before.copy()).permute(2, 0, 1).float() / 255, after])
        (e0, n0), (e1, n1) = (hand_errors(f, given) for f in self.hand_detector.estimate(pair))
        return {
            "hands": len(given), "detected_before": n0, "detected_after": n1,
            "error_before_px": float(np.mean(e0)) if e0 else None,
            "error_after_px": float(np.mean(e1)) if e1 else None,
        }  # fmt: skip

    def write_outputs(self, batch: dict, out: dict) -> None:
        inter = self.out_dir / "intermediate"
        inter.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"report-rank{self.global_rank}.jsonl").open("a") as reports:
            for i, key in enumerate(batch["key"]):
                depth = torch.from_numpy(out["depths"][i]).float()[None].expand(3, -1, -1)
                mask = torch.from_numpy(out["masks"][i]).float()[None].expand(3, -1, -1)
                save_image(torch.cat([depth, mask], -1), inside(inter, f"{key}_depth_mask.png"))
                record = {
                    "key": key, "depth": self.depth_source, "strength": out["strengths"][i],
                    "refined": out["strengths"][i] is not None, "hands": out["reports"][i],
                }  # fmt: skip
                if self.check_hands:
                    record["check"] = self.hand_check(
                        out["inputs"][i], out["images"][i], out["people"][i]
                    )
                reports.write(json.dumps(record) + "\n")
                save_png(out["images"][i], inside(self.out_dir, f"{key}.png"))

    def summary(self) -> dict[str, float]:
        """Timings; the fraction of images refined; MediaPipe's hand keypoint error (px, over
        the hands found) and detection rate of the conditioning hands, before and after."""
        # a key written twice (a run killed between its report and its image, then resumed)
        # counts once, with its last record
        records = list({r["key"]: r for r in read_reports(self.out_dir)}.values())
        out = super().summary()
        if not records:
            return out
        out["refined_fraction"] = sum(r["refined"] for r in records) / len(records)
        checks = [r["check"] for r in records if r.get("check", {}).get("hands")]
        if checks:
            hands = sum(c["hands"] for c in checks)
            for when in ("before", "after"):
                found = sum(c[f"detected_{when}"] for c in checks)
                out[f"refiner_detected_{when}"] = found / hands
                # mean over hands: each image's mean weighted by its number of hands found
                errors = [(c[f"error_{when}_px"], c[f"detected_{when}"]) for c in checks
                          if c[f"error_{when}_px"] is not None]  # fmt: skip
                if errors:
                    out[f"refiner_error_{when}_px"] = sum(e * n for e, n in errors) / sum(
                        n for _, n in errors
                    )
        return out
