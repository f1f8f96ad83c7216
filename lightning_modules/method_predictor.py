"""``trainer.predict`` for single-stage methods (HumanSD, the ControlNet baseline, plain SD):
poses and prompts in, one image per sample key out."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import save_image

from datamodules.full_body_datamodule import FullBodyConfig
from datamodules.rendering import render_full_skeleton
from lightning_modules.two_stage_pipeline import seeds_for


class MethodPredictor(L.LightningModule):
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
        seed: int = 0,
    ):
        super().__init__()
        from experiments.run import load_module

        self.method, method_cfg = load_module(config, ckpt)
        self.body = FullBodyConfig(**(method_cfg["data"]["params"].get("body") or {}))
        self.out_dir = Path(out_dir)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed

    def pose_images(self, people: list) -> torch.Tensor:
        res, b = self.body.resolution, self.body
        return torch.stack([
            torch.from_numpy(render_full_skeleton(
                p, (res, res), b.body_line_width, b.hand_line_width, b.skeleton_layout,
                b.draw_hands,
            )).permute(2, 0, 1).float() / 255
            for p in people
        ])  # fmt: skip

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        generators = [torch.Generator().manual_seed(s) for s in seeds_for(batch["key"], self.seed)]
        images = self.method.sample(
            self.pose_images(batch["people"]),
            batch["caption"],
            generator=generators,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for key, image in zip(batch["key"], images, strict=True):
            save_image(image, self.out_dir / f"{key}.png")
