"""InterHand2.6M -> schema shards (3D joints projected with each camera, reordered).

    python -m datamodules.convert_interhand --src IH26M_ROOT --split train --out SHARDS \
        [--every 10] [--processes 4]

Expected layout (https://mks0601.github.io/InterHand2.6M/, v1.0 annotations):

    IH26M_ROOT/annotations/<split>/InterHand2.6M_<split>_data.json     COCO-style images
    IH26M_ROOT/annotations/<split>/InterHand2.6M_<split>_camera.json   per capture: campos,
                                                                       camrot, focal, princpt
    IH26M_ROOT/annotations/<split>/InterHand2.6M_<split>_joint_3d.json per capture, frame:
                                                                       world_coord [42, 3]
    IH26M_ROOT/images/<split>/<file_name>

The 42 joints are the right hand (0-20) then the left (21-41), each from the thumb tip to the
little-finger base with the wrist last; :data:`INTERHAND_TO_SCHEMA` reorders a hand into the
schema's 21-point order (wrist, then thumb..pinky from base to tip). A joint is projected as
``x_cam = R (X_world - campos)``, ``u = fx * x / z + cx``, ``v = fy * y / z + cy``. Only every
``--every``-th frame of a sequence and camera is kept (video frames are near duplicates), and
only hands with at least ``--min-valid`` valid joints inside the image.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from datamodules.converter import (
    Drop,
    add_engine_arguments,
    convert_from_args,
    encode_jpeg,
    read_rgb,
)

# schema index -> InterHand index within one hand (thumb tip..base = 0..3, ..., wrist = 20)
INTERHAND_TO_SCHEMA = (20, 3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12, 19, 18, 17, 16)


@dataclass
class InterHandItem:
    key: str
    image_path: Path
    width: int
    height: int
    world: np.ndarray  # [42, 3] mm
    valid: np.ndarray  # [42]
    camera: dict  # campos [3], camrot [3, 3], focal [2], princpt [2]
    hand_type: str


def project(world: np.ndarray, camera: dict) -> np.ndarray:
    """World joints ``[N, 3]`` -> image pixels ``[N, 2]`` (and depth > 0 checked by caller)."""
    rot = np.asarray(camera["camrot"], dtype=np.float64).reshape(3, 3)
    pos = np.asarray(camera["campos"], dtype=np.float64).reshape(3)
    cam = (rot @ (world - pos).T).T
    focal, princpt = np.asarray(camera["focal"]), np.asarray(camera["princpt"])
    return cam[:, :2] / cam[:, 2:3] * focal + princpt, cam[:, 2]


def visible_hand(
    uv: np.ndarray, depth: np.ndarray, valid: np.ndarray, width: int, height: int, min_valid: int
) -> np.ndarray | None:
    """Schema ``[21, 3]`` keypoints from projected joints ``uv [21, 2]`` (schema order), their
    camera depths and validity; None when fewer than ``min_valid`` are valid, in front of the
    camera and inside the ``width`` x ``height`` image."""
    inside = (
        (uv[:, 0] >= 0) & (uv[:, 0] <= width) & (uv[:, 1] >= 0) & (uv[:, 1] <= height) & (depth > 0)
    )
    ok = (valid > 0) & inside
    if ok.sum() < min_valid:
        return None
    kp = np.zeros((21, 3))
    kp[ok, :2] = uv[ok].round(2)
    kp[ok, 2] = 2
    return kp


def hand_keypoints(item: InterHandItem, hand: int, min_valid: int) -> np.ndarray | None:
    """Schema-ordered ``[21, 3]`` keypoints of hand 0 (right) or 1 (left), or None."""
    joints = np.asarray(INTERHAND_TO_SCHEMA) + 21 * hand
    uv, depth = project(item.world[joints], item.camera)
    return visible_hand(uv, depth, item.valid[joints], item.width, item.height, min_valid)


def two_hand_sample(
    key: str,
    pixels: np.ndarray,
    right: np.ndarray | None,
    left: np.ndarray | None,
    source: dict,
) -> dict:
    """A schema sample of a hand close-up: one person whose box spans the visible joints."""
    height, width = pixels.shape[:2]
    points = np.concatenate([h[h[:, 2] > 0, :2] for h in (right, left) if h is not None])
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    what = (
        "two hands"
        if right is not None and left is not None
        else "a right hand"
        if right is not None
        else "a left hand"
    )
    record = {
        "width": width, "height": height, "caption": f"a close-up photo of {what}",
        "source": source,
        "people": [{"bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "body": np.zeros((17, 3)).tolist(),
                    "left_hand": None if left is None else left.tolist(),
                    "right_hand": None if right is None else right.tolist()}],
    }  # fmt: skip
    return {"__key__": key, "jpg": encode_jpeg(pixels), "json": json.dumps(record).encode()}


def interhand_sample(item: InterHandItem, min_valid: int = 15) -> dict | Drop:
    right = hand_keypoints(item, 0, min_valid)
    left = hand_keypoints(item, 1, min_valid)
    if right is None and left is None:
        return Drop("no_valid_hand")
    pixels = read_rgb(item.image_path)
    if isinstance(pixels, Drop):
        return pixels
    source = {"dataset": "interhand2.6m", "id": item.key, "hand_type": item.hand_type}
    return two_hand_sample(item.key, pixels, right, left, source)


def list_items(src: Path, split: str, every: int) -> list[InterHandItem]:
    ann = src / "annotations" / split
    data = json.loads((ann / f"InterHand2.6M_{split}_data.json").read_text())
    cameras = json.loads((ann / f"InterHand2.6M_{split}_camera.json").read_text())
    joints = json.loads((ann / f"InterHand2.6M_{split}_joint_3d.json").read_text())
    items = []
    for image in sorted(data["images"], key=lambda im: im["id"]):
        if int(image["frame_idx"]) % every:
            continue
        capture, cam, frame = str(image["capture"]), str(image["camera"]), str(image["frame_idx"])
        joint = joints.get(capture, {}).get(frame)
        camera = cameras.get(capture)
        if joint is None or camera is None:
            continue
        camera = {k: camera[k][cam] for k in ("campos", "camrot", "focal", "princpt")}
        key = f"ih{image['id']:09d}"
        items.append(InterHandItem(
            key, src / "images" / split / image["file_name"], int(image["width"]),
            int(image["height"]), np.asarray(joint["world_coord"], dtype=np.float64),
            np.asarray(joint["joint_valid"], dtype=np.float64).reshape(-1),
            camera, str(joint.get("hand_type", "")),
        ))  # fmt: skip
    return items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True)
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--every", type=int, default=10, help="keep every N-th frame")
    parser.add_argument("--min-valid", type=int, default=15, help="valid joints per hand")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    items = list_items(Path(args.src), args.split, args.every)
    # split by capture session and sequence, so frames of one sequence stay together
    return convert_from_args(
        items,
        lambda i: "/".join(Path(i.image_path).parts[-4:-2]),
        partial(interhand_sample, min_valid=args.min_valid),
        args,
        desc="interhand",
    )


if __name__ == "__main__":
    main()
