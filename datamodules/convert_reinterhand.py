"""Re:InterHand -> schema shards (3D keypoints projected into each Mugsy camera, reordered).

    python -m datamodules.convert_reinterhand --src REIH_ROOT --out SHARDS \
        [--split train|test|all] [--envmap envmap_per_frame] [--every 5] [--processes 4]

Expected layout (https://mks0601.github.io/ReInterHand/, the "Mugsy_cameras" renderings):

    REIH_ROOT/data/<capture id>/Mugsy_cameras/cam_params.json
        {camera name: {"R": [3, 3], "t": [3] (mm), "focal": [2], "princpt": [2], "D": [4]?}}
    REIH_ROOT/data/<capture id>/Mugsy_cameras/<envmap>/images/<camera name>/<frame:06d>.png
    REIH_ROOT/data/<capture id>/orig_fits/{right,left}/Keypoints/keypoint-<frame:06d>.json
        [24, 3] world coordinates in mm

Each hand has 24 keypoints: wrist, thumb 0-4, index 1-4, middle 1-4, ring 1-4, pinky 0-4 and a
forearm stub; :data:`REINTERHAND_TO_SCHEMA` keeps the 21 the schema (and MANO) use. A point is
projected as ``x_cam = R X + t``; cameras with ``D`` are fisheye (Kannala-Brandt, projected with
OpenCV's ``cv2.fisheye``), the others pinhole. Frames are subsampled per capture and camera
(``--every``: keep every N-th of the rendered frames, in order). The train/test split is the
dataset's own (three test captures); shards are split train/val by capture, so one subject
never lands in both.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from datamodules.convert_interhand import two_hand_sample, visible_hand
from datamodules.converter import Drop, add_engine_arguments, convert_from_args, read_rgb

# schema index -> Re:InterHand index within one hand (0 wrist, 1-5 thumb 0-4, 6-9 index 1-4,
# 10-13 middle, 14-17 ring, 18-22 pinky 0-4, 23 forearm stub); thumb 0 and pinky 0 are dropped
REINTERHAND_TO_SCHEMA = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22)
# the captures Re:InterHand's own loader holds out for testing
TEST_CAPTURES = (
    "m--20221215--0949--RNS217--pilot--ProjectGoliathScript--Hands--two-hands",
    "m--20221216--0953--NKC880--pilot--ProjectGoliathScript--Hands--two-hands",
    "m--20230317--1130--QZX685--pilot--ProjectGoliath--Hands--two-hands",
)


@dataclass
class ReInterHandItem:
    capture: str
    camera_name: str
    frame: int
    image_path: Path
    keypoint_paths: tuple[Path, Path]  # right, left
    camera: dict  # R [3, 3], t [3] mm, focal [2], princpt [2], optional D [4]

    @property
    def key(self) -> str:
        # capture ids hold "--" and dots are extension separators in WebDataset keys
        return f"reih_{self.capture}_{self.camera_name}_{self.frame:06d}".replace(".", "_")


def project(world: np.ndarray, camera: dict) -> tuple[np.ndarray, np.ndarray]:
    """World points ``[N, 3]`` (mm) -> image pixels ``[N, 2]`` and camera depths ``[N]``."""
    rot = np.asarray(camera["R"], dtype=np.float64).reshape(3, 3)
    cam = world @ rot.T + np.asarray(camera["t"], dtype=np.float64).reshape(1, 3)
    fx, fy = np.asarray(camera["focal"], dtype=np.float64)
    cx, cy = np.asarray(camera["princpt"], dtype=np.float64)
    if camera.get("D") is None:
        return cam[:, :2] / cam[:, 2:3] * (fx, fy) + (cx, cy), cam[:, 2]
    matrix = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    uv, _ = cv2.fisheye.projectPoints(
        cam.reshape(-1, 1, 3), np.zeros(3), np.zeros(3), matrix,
        np.asarray(camera["D"], dtype=np.float64).reshape(4),
    )  # fmt: skip
    return uv.reshape(-1, 2), cam[:, 2]


def _read_keypoints(path: Path) -> np.ndarray | None:
    try:
        points = np.asarray(json.loads(path.read_text()), dtype=np.float64)
    except (OSError, ValueError):
        return None
    return points if points.shape == (24, 3) else None


def reinterhand_sample(item: ReInterHandItem, min_valid: int = 15) -> dict | Drop:
    worlds = [_read_keypoints(path) for path in item.keypoint_paths]
    if all(w is None for w in worlds):
        return Drop("missing_keypoints")
    pixels = read_rgb(item.image_path)
    if isinstance(pixels, Drop):
        return pixels
    height, width = pixels.shape[:2]
    hands = []
    for world in worlds:
        if world is None:
            hands.append(None)
            continue
        uv, depth = project(world[list(REINTERHAND_TO_SCHEMA)], item.camera)
        hands.append(visible_hand(uv, depth, np.ones(21), width, height, min_valid))
    right, left = hands
    if right is None and left is None:
        return Drop("no_valid_hand")
    source = {"dataset": "reinterhand", "id": item.key, "capture": item.capture,
              "camera": item.camera_name, "frame": item.frame}  # fmt: skip
    return two_hand_sample(item.key, pixels, right, left, source)


def list_items(src: Path, split: str, envmap: str, every: int) -> list[ReInterHandItem]:
    """Every kept (capture, camera, frame) of a Re:InterHand root, in a stable order."""
    data = src / "data"
    captures = sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
    if split != "all":
        captures = [c for c in captures if (c in TEST_CAPTURES) == (split == "test")]
    items = []
    for capture in captures:
        root = data / capture
        params_file = root / "Mugsy_cameras" / "cam_params.json"
        if not params_file.is_file():
            continue
        params = json.loads(params_file.read_text())
        for camera_name in sorted(params):
            images = root / "Mugsy_cameras" / envmap / "images" / camera_name
            for frame in sorted(int(p.stem) for p in images.glob("*.png"))[::every]:
                keypoints = tuple(
                    root / "orig_fits" / side / "Keypoints" / f"keypoint-{frame:06d}.json"
                    for side in ("right", "left")
                )
                items.append(ReInterHandItem(
                    capture, camera_name, frame, images / f"{frame:06d}.png", keypoints,
                    params[camera_name],
                ))  # fmt: skip
    return items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="Re:InterHand root (holds data/)")
    parser.add_argument("--split", default="train", choices=("train", "test", "all"))
    parser.add_argument("--envmap", default="envmap_per_frame",
                        choices=("envmap_per_frame", "envmap_per_segment"))  # fmt: skip
    parser.add_argument("--every", type=int, default=5, help="keep every N-th rendered frame")
    parser.add_argument("--min-valid", type=int, default=15, help="visible joints per hand")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    items = list_items(Path(args.src), args.split, args.envmap, args.every)
    if not items:
        raise SystemExit(
            f"--src {args.src!r}: no Re:InterHand frames found "
            f"(expected data/<capture>/Mugsy_cameras/{args.envmap}/images/<camera>/*.png)"
        )
    return convert_from_args(
        items,
        lambda i: i.capture,
        partial(reinterhand_sample, min_valid=args.min_valid),
        args,
        desc="reinterhand",
    )


if __name__ == "__main__":
    main()
