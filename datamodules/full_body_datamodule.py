"""Full-body examples for the stage-2 outpainter: image, skeleton, hand mask and hand canvas."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Literal

import numpy as np
import torch
from PIL import Image

from datamodules.rendering import hull_mask, render_full_skeleton
from datamodules.schema import MIN_IMAGE_SIZE, Person, Sample
from datamodules.shard_datamodule import ExampleFn, ShardDataModule

# COCO-17 left/right pairs, swapped by a horizontal flip.
COCO_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


@dataclass
class FullBodyConfig:
    resolution: int = 128
    body_line_width: int = 2
    hand_line_width: int = 1
    hull_dilation: int = 2  # px at training resolution, for hand masks from keypoints
    flip_prob: float = 0.5
    require_hands: bool = False  # skip images without a labelled hand
    # datamodules.rendering.draw_body_skeleton; humansd16: HumanSD's released renderer
    skeleton_layout: Literal["openpose18", "coco17", "humansd16"] = "openpose18"
    draw_hands: bool = True  # HumanSD's pose images have no hands
    max_people: int = 4  # body keypoints are batched as [B, max_people, 17, 3]


def _scaled(people: list[Person], scale: float, offset: tuple[float, float]) -> list[Person]:
    def move(kp):
        if kp is None:
            return None
        out = kp.copy()
        out[:, :2] = out[:, :2] * scale + offset
        return out

    return [Person(p.bbox, move(p.body), move(p.left_hand), move(p.right_hand)) for p in people]


def letterbox(sample: Sample, resolution: int):
    """Resize the longer side to ``resolution`` and centre on a black square canvas; returns
    ``(pixels [R, R, 3] uint8, mask [R, R] uint8 or None, people in canvas pixels)``."""
    width, height = sample.image.size
    scale = resolution / max(width, height)
    w, h = round(width * scale), round(height * scale)
    ox, oy = (resolution - w) // 2, (resolution - h) // 2
    pixels = np.zeros((resolution, resolution, 3), np.uint8)
    pixels[oy : oy + h, ox : ox + w] = np.asarray(sample.image.resize((w, h), Image.BICUBIC))
    mask = None
    if sample.mask is not None:
        mask = np.zeros((resolution, resolution), np.uint8)
        resized = Image.fromarray(sample.mask).resize((w, h), Image.BILINEAR)
        mask[oy : oy + h, ox : ox + w] = (np.asarray(resized) >= 128) * 255
    # pixel edges map exactly: x -> x * (w / width) + ox, within rounding of w
    return pixels, mask, _scaled(sample.people, w / width, (ox, oy))


def flip_people(people: list[Person], width: int) -> list[Person]:
    """Mirror keypoints and swap left/right body joints and hands."""

    def mirror(kp, order=None):
        if kp is None:
            return None
        out = kp.copy() if order is None else kp[list(order)].copy()
        out[:, 0] = np.where(out[:, 2] > 0, width - out[:, 0], out[:, 0])
        return out

    return [
        Person(p.bbox, mirror(p.body, COCO_FLIP), mirror(p.right_hand), mirror(p.left_hand))
        for p in people
    ]


def hands_of(people: list[Person]) -> list[np.ndarray]:
    return [
        h
        for p in people
        for h in (p.left_hand, p.right_hand)
        if h is not None and (h[:, 2] > 0).sum() >= 3
    ]


def full_body_example(
    sample: Sample, augment: bool, rng: random.Random, config: FullBodyConfig
) -> Iterator[dict]:
    """One example per image: ``image`` ``[3, R, R]`` in [-1, 1], ``pose_image`` (body + hands
    skeleton) ``[3, R, R]`` in [0, 1], ``hand_mask`` ``[1, R, R]`` in {0, 1} (the known region),
    ``canvas`` = image inside the hand mask, 0 (grey) elsewhere — the real hands pasted back,
    as stage 1's hands will be at inference — ``body_keypoints`` ``[max_people, 17, 3]`` in
    pixels (zero rows for absent people), plus ``mask_from_file``, ``caption``, ``key``."""
    res = config.resolution
    pixels, mask, people = letterbox(sample, res)
    hands = hands_of(people)
    if config.require_hands and not hands:
        return
    if mask is None:
        mask = np.zeros((res, res), np.uint8)
        for hand in hands:
            mask |= hull_mask(hand, (res, res), config.hull_dilation)
    if augment and rng.random() < config.flip_prob:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
        people = flip_people(people, res)
    skeleton = render_full_skeleton(
        people,
        (res, res),
        config.body_line_width,
        config.hand_line_width,
        config.skeleton_layout,
        config.draw_hands,
    )
    bodies = np.zeros((config.max_people, 17, 3), np.float32)
    for n, person in enumerate(people[: config.max_people]):
        bodies[n] = person.body
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1
    hand_mask = torch.from_numpy((mask >= 128).astype(np.float32).copy())[None]
    yield {
        "image": image,
        "pose_image": torch.from_numpy(skeleton).permute(2, 0, 1).float() / 255,
        "hand_mask": hand_mask,
        "canvas": image * hand_mask,
        "body_keypoints": torch.from_numpy(bodies),
        "mask_from_file": sample.mask is not None,
        "caption": sample.caption,
        "key": sample.key,
    }


class FullBodyDataModule(ShardDataModule):
    """Full-body training data for the outpainter, the ControlNet baseline and HumanSD (see
    :func:`full_body_example`). ``latent_cache``: a folder written by ``make cache-latents`` for
    these shards and settings (the body keypoints travel with the latents)."""

    cache_passthrough = ("body_keypoints",)

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        body: FullBodyConfig | dict | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        resampled: bool = True,
        epoch_size: int = 1000,
        shuffle_buffer: int = 256,
        seed: int = 0,
        min_image_size: int = MIN_IMAGE_SIZE,
        latent_cache: str | None = None,
    ):
        super().__init__(
            train_shards,
            val_shards,
            batch_size,
            num_workers,
            resampled,
            epoch_size,
            shuffle_buffer,
            seed,
            min_image_size,
        )
        self.save_hyperparameters(logger=False)
        self.body = body if isinstance(body, FullBodyConfig) else FullBodyConfig(**(body or {}))
        self.open_latent_cache(latent_cache)

    def example_fn(self) -> ExampleFn:
        return partial(full_body_example, config=self.body)

    @property
    def flip_prob(self) -> float:
        return self.body.flip_prob

    def example_view(self, flip: bool) -> ExampleFn:
        return partial(full_body_example, config=replace(self.body, flip_prob=float(flip)))

    def cache_settings(self) -> dict:
        body = {k: v for k, v in asdict(self.body).items() if k != "flip_prob"}
        return {
            "datamodule": "FullBodyDataModule",
            "body": body,
            "min_image_size": self.min_image_size,
        }
