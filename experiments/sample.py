"""Sample images from one pose and a prompt, with any method of an evaluation config.

    .venv/bin/python -m experiments.sample --pose pose.json --prompt "a person waving" \
        [--methods two_stage humansd] [--config experiments/eval/tiny.yaml] [--seed 0]
    --pose FILE      a JSON record in the sample schema ({"width", "height", "people": [...]})
                     or an OpenPose JSON ({"people": [{"pose_keypoints_2d", "hand_left_...",
                     "hand_right_keypoints_2d"}]}, BODY_25 or COCO-18; --size W H gives its
                     image size when the file has no canvas_width/canvas_height)
    --photo FILE     a photo: the pose is detected with pose_estimation.MediaPipePeople
    --skeleton FILE  a skeleton image, given as is to the methods that condition on the
                     skeleton image alone (HumanSD, the ControlNet baseline, plain SD); the
                     two-stage method and the hand generator need keypoints

The methods are those of the evaluation config (the same definitions `make eval` scores);
methods whose checkpoint is ``last`` and missing are trained first, as `make eval` does. Each
method writes ``<out>/<method>/<key>.png`` (its seed: ``seed`` + a stable hash of the key, as in
an evaluation), ``<key>_skeleton.png`` and ``<key>_with_skeleton.png``, the skeleton beside the
image.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.utils import save_image

from datamodules.annotate import schema_people
from datamodules.converter import Drop, read_rgb
from datamodules.full_body_datamodule import FullBodyConfig
from datamodules.rendering import render_full_skeleton
from datamodules.schema import Person, Sample, SampleError, key_problem, parse_people
from experiments.config import ConfigError
from experiments.evaluate import ensure_trained, load_config
from experiments.notices import configure_logging
from experiments.run import limit_threads, make
from pose_estimation import MediaPipePeople
from pose_estimation.people import bbox_of

# OpenPose body -> COCO-17 (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles;
# left before right), by keypoint count: COCO-18 (neck at 1) and BODY_25 (neck 1, mid-hip 8)
OPENPOSE_TO_COCO = {
    18: (0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10),
    25: (0, 16, 15, 18, 17, 5, 2, 6, 3, 7, 4, 12, 9, 13, 10, 14, 11),
}
IMAGE_ONLY_METHODS = "MethodPredictor"  # the predictors that take a skeleton image as is


@dataclass
class Pose:
    """What to generate from: people in a ``size`` (width, height) image, or a skeleton image
    ``[H, W, 3]`` uint8 for methods that take the image itself."""

    people: list[Person]
    size: tuple[int, int]
    skeleton: np.ndarray | None = None


def _points(values, count: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (count * 3,):
        raise ValueError(f"{name} has {array.size} values, expected {count * 3}")
    return array.reshape(count, 3)


def openpose_people(record: dict, size: tuple[int, int]) -> list[Person]:
    """OpenPose's ``people`` (BODY_25 or COCO-18 body, optional 21-point hands in the same
    order as the schema's, the person's own left and right) as schema people; a keypoint with
    confidence 0 is unlabelled, others keep the confidence as their score."""
    records = []
    for n, entry in enumerate(record["people"]):
        flat = entry.get("pose_keypoints_2d") or []
        count = len(flat) // 3
        if count not in OPENPOSE_TO_COCO:
            raise ValueError(
                f"people[{n}].pose_keypoints_2d has {len(flat)} values: expected BODY_25 (75) "
                "or COCO-18 (54)"
            )
        body = _points(flat, count, f"people[{n}].pose_keypoints_2d")[list(OPENPOSE_TO_COCO[count])]
        hands = {}
        for side in ("left", "right"):
            values = entry.get(f"hand_{side}_keypoints_2d")
            hand = _points(values, 21, f"people[{n}].hand_{side}_keypoints_2d") if values else None
            hands[side] = None if hand is None or not (hand[:, 2] > 0).any() else hand
        records.append({
            "bbox": bbox_of(body, hands["left"], hands["right"]), "body": body.tolist(),
            **{f"{side}_hand": None if h is None else h.tolist() for side, h in hands.items()},
        })  # fmt: skip
    return parse_people(records, *size)


MAX_SIDE = 8192  # a pose file names its image size; a huge one would only exhaust memory


def _checked_size(size) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"image size {width} x {height}: each side must be 1 to {MAX_SIDE} px")
    return width, height


def read_pose(path: str, size: tuple[int, int] | None = None) -> Pose:
    """A pose JSON file (sample schema or OpenPose); one clear error naming the file."""
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict) or not isinstance(record.get("people"), list):
            raise ValueError("expected an object with a 'people' list")
        if record["people"] and "pose_keypoints_2d" in record["people"][0]:
            canvas = record.get("canvas_width"), record.get("canvas_height")
            size = size or (canvas if all(canvas) else None)
            if size is None:
                raise ValueError(
                    "an OpenPose file has no image size: pass --size WIDTH HEIGHT (or add "
                    "canvas_width and canvas_height)"
                )
            size = _checked_size(size)
            return Pose(openpose_people(record, size), size)
        size = _checked_size((record["width"], record["height"]))
        return Pose(parse_people(record["people"], *size), size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SampleError) as exc:
        raise ConfigError(f"--pose {path}: {exc}") from None


def read_photo(path: str) -> Pose:
    """The people MediaPipe finds in a photo."""
    pixels = read_rgb(Path(path))
    if isinstance(pixels, Drop):
        raise ConfigError(f"--photo {path}: not a readable image ({pixels.reason})")
    height, width = pixels.shape[:2]
    people = schema_people(MediaPipePeople().people(pixels), width, height)
    if not people:
        raise ConfigError(f"--photo {path}: no person or hand found")
    return Pose(parse_people(people, width, height), (width, height))


def read_skeleton(path: str) -> Pose:
    pixels = read_rgb(Path(path))
    if isinstance(pixels, Drop):
        raise ConfigError(f"--skeleton {path}: not a readable image ({pixels.reason})")
    return Pose([], (pixels.shape[1], pixels.shape[0]), pixels)


@dataclass
class Generated:
    image: Path  # <out>/<method>/<name>.png
    skeleton: Path  # <name>_skeleton.png: the pose as the method was given it
    pair: Path  # <name>_with_skeleton.png: the two side by side


class Sampler:
    """The methods of an evaluation config, each loaded once: ``sampler(method, pose, prompt,
    seed, key)`` writes one image per generated output (several hand crops for the hand
    generator) and returns their :class:`Generated` paths."""

    def __init__(
        self, config: str, out_dir: str = "results/samples", overrides=(), device: str = "auto"
    ):
        container = load_config([config], list(overrides))
        self.methods = {m: n for m, n in container["methods"].items() if n is not None}
        self.train_overrides = container.get("train_overrides") or []
        self.out_dir = Path(out_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._predictors: dict[str, object] = {}

    def predictor(self, method: str, seed: int = 0):
        """The method's predictor, loaded once, sampling with ``seed``."""
        if method not in self.methods:
            raise ConfigError(f"method {method!r}: the config has {sorted(self.methods)}")
        if not self.runnable(method):
            raise ConfigError(
                f"method {method!r} repairs the evaluation set's own photos; for your images "
                "use make refine IMAGES=DIR"
            )
        if method not in self._predictors:
            ensure_trained({method: self.methods[method]}, self.train_overrides)
            node = self.methods[method]
            extra = {}
            if self.base_of(method):  # a post-step (HandRefiner) reads its base's images
                extra["base_images"] = str(self.out_dir / self.base_of(method))
            predictor = make(node, out_dir=str(self.out_dir / method), seed=seed, **extra)
            predictor = predictor.to(self.device).eval()
            predictor.out_dir.mkdir(parents=True, exist_ok=True)
            self._predictors[method] = predictor
        predictor = self._predictors[method]
        predictor.seed = seed
        return predictor

    def takes_skeleton_images(self, method: str) -> bool:
        """Whether the method conditions on the skeleton image alone (no keypoints)."""
        return self.methods.get(method, {}).get("target", "").split(".")[-1] == IMAGE_ONLY_METHODS

    def base_of(self, method: str) -> str | None:
        """The method whose images a post-step method (HandRefiner) repairs, if any."""
        return (self.methods.get(method, {}).get("params") or {}).get("base_method")

    def runnable(self, method: str) -> bool:
        """False for a refiner of the evaluation set's photos, which a pose does not give."""
        node = self.methods.get(method, {})
        refiner = node.get("target", "").endswith("RefinerPredictor")
        return not refiner or self.base_of(method) is not None

    def __call__(
        self, method: str, pose: Pose, prompt: str, seed: int = 0, key: str = "sample"
    ) -> list[Generated]:
        problem = key_problem(key)
        if problem:
            raise ConfigError(f"key {key!r}: {problem}")
        if (
            pose.skeleton is not None
            and self.methods.get(method, {}).get("target", "").split(".")[-1] != IMAGE_ONLY_METHODS
        ):
            raise ConfigError(
                f"method {method!r} needs keypoints (it draws hands from them): give --pose or "
                "--photo instead of a skeleton image"
            )
        base = self.base_of(method)
        if base is not None:
            self(base, pose, prompt, seed, key)  # the images the post-step repairs
        predictor = self.predictor(method, seed)
        resolution = predictor.resolution
        if pose.skeleton is not None:  # letterboxed, as keypoints are
            skeleton = ImageOps.pad(Image.fromarray(pose.skeleton), (resolution,) * 2, color=0)
            pose_image = torch.from_numpy(np.asarray(skeleton).copy()).permute(2, 0, 1)
            batch = {"key": [key], "caption": [prompt], "pose_image": pose_image[None] / 255}
        else:
            image = Image.new("RGB", pose.size)
            batch = predictor.batch_for(Sample(key, "", image, prompt, {}, pose.people))
            if batch is None:
                raise ConfigError(f"method {method!r}: nothing to generate from this pose")
        with torch.inference_mode():
            outputs = predictor.sample_batch(batch)
            predictor.write_outputs(batch, outputs)
        if "pose_image" in batch:
            skeletons = batch["pose_image"]
        elif hasattr(predictor, "pose_images"):  # the skeletons this method renders
            skeletons = predictor.pose_images(batch["people"]).cpu()
        else:
            skeletons = self.skeletons(batch, resolution)
        written = []
        for name, skeleton in zip(batch["key"], skeletons, strict=True):
            out = Generated(*(predictor.out_dir / f"{name}{suffix}.png"
                              for suffix in ("", "_skeleton", "_with_skeleton")))  # fmt: skip
            generated = torch.from_numpy(np.asarray(Image.open(out.image).convert("RGB")).copy())
            generated = generated.permute(2, 0, 1).float() / 255
            if skeleton.shape[-2:] != generated.shape[-2:]:  # a post-step keeps its base's size
                size = generated.shape[-2:]
                skeleton = F.interpolate(skeleton[None].float(), size=size, mode="area")[0]
            save_image(skeleton.float(), out.skeleton)
            save_image(torch.cat([skeleton.float(), generated], -1), out.pair)
            written.append(out)
        return written

    @staticmethod
    def skeletons(batch: dict, resolution: int) -> torch.Tensor:
        """The batch's people drawn as full-body skeletons ``[B, 3, R, R]`` (the default
        layout), to show beside each image."""
        body = FullBodyConfig(resolution=resolution)
        return torch.stack([
            torch.from_numpy(render_full_skeleton(
                people, (resolution, resolution), body.body_line_width, body.hand_line_width
            )).permute(2, 0, 1).float() / 255
            for people in batch["people"]
        ])  # fmt: skip


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog=".venv/bin/python -m experiments.sample",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pose", help="pose JSON: sample schema or OpenPose")
    source.add_argument("--photo", help="a photo to detect the pose in")
    source.add_argument("--skeleton", help="a skeleton image (HumanSD, ControlNet, plain SD)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--methods", nargs="+", default=["two_stage"])
    parser.add_argument("--config", default="experiments/eval/tiny.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/samples")
    parser.add_argument("--key", help="output name (default: the input file's name)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("W", "H"))
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    configure_logging()
    limit_threads()
    try:
        if args.pose:
            pose, source_file = read_pose(args.pose, args.size), args.pose
        elif args.photo:
            pose, source_file = read_photo(args.photo), args.photo
        else:
            pose, source_file = read_skeleton(args.skeleton), args.skeleton
        sampler = Sampler(args.config, args.out, args.overrides, args.device)
        key = args.key or Path(source_file).stem
        written = []
        for method in args.methods:
            for made in sampler(method, pose, args.prompt, args.seed, key):
                written += [made.image, made.skeleton, made.pair]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in written:
        print(f"written: {path}")
    return written


if __name__ == "__main__":
    main()
