"""``trainer.predict`` for single-model methods: full-body generators (HumanSD, the ControlNet
baseline, plain SD) and the stage-1 hand generator on its own."""

from __future__ import annotations

from dataclasses import asdict

import torch

from datamodules.full_body_datamodule import FullBodyConfig
from datamodules.hand_crops import HandCropConfig
from datamodules.rendering import render_full_skeleton
from lightning_modules.predictor import ExperimentLoader, GenerationPredictor


class MethodPredictor(GenerationPredictor):
    """Loads a method from its experiment ``config`` (and ``ckpt``: a file, ``last``, or None
    for the weights the config names, e.g. plain SD from ``pretrained``), renders each pose as
    that config's datamodule renders skeletons, and writes ``<out_dir>/<key>.png``. Seeds are
    per sample key, so results do not depend on batching or on the number of processes."""

    def __init__(
        self,
        config: str,
        ckpt: str | None = "last",
        out_dir: str = "results/samples",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        prompt_template: str = "{}",
        seed: int = 0,
        load_experiment: ExperimentLoader | None = None,
    ):
        super().__init__(out_dir, seed, load_experiment)
        if "{}" not in prompt_template:
            raise ValueError(f"prompt_template={prompt_template!r} needs a '{{}}' for the prompt")
        self.method, method_cfg = self.load(config, ckpt)
        self.body = FullBodyConfig(**(method_cfg["data"]["params"].get("body") or {}))
        self.resolution = self.body.resolution
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        # e.g. "{}, <hand>": a learned token added to every prompt (textual inversion)
        self.prompt_template = prompt_template
        if prompt_template != "{}":
            self.settings = {"prompt": prompt_template}

    def pose_images(self, people: list) -> torch.Tensor:
        res, b = self.body.resolution, self.body
        return torch.stack([
            torch.from_numpy(render_full_skeleton(
                p, (res, res), b.body_line_width, b.hand_line_width, b.skeleton_layout,
                b.draw_hands,
            )).permute(2, 0, 1).float() / 255
            for p in people
        ])  # fmt: skip

    def sample_batch(self, batch: dict) -> torch.Tensor:
        """``batch["people"]`` rendered as this method's skeletons, or a given
        ``batch["pose_image"]`` ``[B, 3, R, R]`` in [0, 1] (a skeleton image from a user)."""
        poses = batch["pose_image"] if "pose_image" in batch else self.pose_images(batch["people"])
        return self.method.sample(
            poses,
            [self.prompt_template.format(c) for c in batch["caption"]],
            generator=self.generators(batch["key"]),
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
        )

    def write_outputs(self, batch: dict, images: torch.Tensor) -> None:
        for key, image in zip(batch["key"], images, strict=True):
            self.write(key, image)


class HandPredictor(GenerationPredictor):
    """The hand generator alone: one crop per visible hand of each sample, cut as the
    generator's training crops were (its config's ``crop`` settings, no flips), written as
    ``<out_dir>/<key>_hand<n>.png`` with the predicted mask in ``<out_dir>/masks/``. Scored on
    hand crops: FID/KID, CLIPSIM and hand pose accuracy (no body metrics)."""

    def __init__(
        self,
        config: str,
        ckpt: str | None = "last",
        out_dir: str = "results/hands",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        load_experiment: ExperimentLoader | None = None,
    ):
        super().__init__(out_dir, seed, load_experiment)
        self.method, method_cfg = self.load(config, ckpt)
        self.crop = HandCropConfig(**(method_cfg["data"]["params"].get("crop") or {}))
        self.hand_crops = self.crop
        self.resolution = self.crop.resolution
        self.scoring_data = {"hand_crops": asdict(self.crop)}
        self.scoring_metrics = {"body_estimator": None}
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale

    def sample_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.sample(
            batch["pose_image"].to(self.device),
            batch["caption"],
            generator=self.generators(batch["key"]),
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
        )

    def write_outputs(self, batch: dict, outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        (self.out_dir / "masks").mkdir(exist_ok=True)
        for key, image, mask in zip(batch["key"], *outputs, strict=True):
            self.write(f"masks/{key}", mask.expand(3, -1, -1))
            self.write(key, image)
