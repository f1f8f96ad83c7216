"""Procedurally drawn people with hands, written as schema shards.

The built-in data of ``make train-hand``, the tests and CI: stick-figure people on cluttered
backgrounds, with COCO-17 body keypoints, two 21-point hands drawn as palm + fingers, an exact
hand mask and a caption that names what the hands do. Right hands are mirror images of left
hands (thumb on the other side), so a horizontal flip really does turn one into the other.

    python -m datamodules.synthetic --out data/synthetic --n 256 --val 32
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

# Body keypoints of a person 1 unit tall facing the viewer, x to the image right: the
# person's left side (odd COCO indices) is on the image's right.
_BODY_TEMPLATE = np.array([
    (0.0, 0.07), (0.02, 0.055), (-0.02, 0.055), (0.045, 0.065), (-0.045, 0.065),
    (0.11, 0.19), (-0.11, 0.19), (0, 0), (0, 0), (0, 0), (0, 0),
    (0.07, 0.52), (-0.07, 0.52), (0.075, 0.72), (-0.075, 0.72), (0.075, 0.93), (-0.075, 0.93),
])  # fmt: skip
_UPPER_ARM, _FOREARM, _HAND = 0.17, 0.15, 0.13
# Per finger (thumb..pinky): base position (along, across) in hand lengths, length, spread.
_FINGERS = (
    ((0.15, 0.22), 0.45, 0.9),
    ((0.45, 0.20), 0.50, 0.20),
    ((0.47, 0.06), 0.55, 0.03),
    ((0.45, -0.08), 0.50, -0.12),
    ((0.40, -0.20), 0.40, -0.28),
)
_SEGMENTS = (0.40, 0.32, 0.28)
_SKIN = ((255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36))
_COLORS = {
    "red": (200, 30, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "yellow": (230, 200, 40),
    "black": (25, 25, 25), "white": (235, 235, 235), "purple": (120, 50, 160),
    "orange": (240, 130, 30),
}  # fmt: skip
_WHO = ("man", "woman", "person", "child", "dancer", "teacher")
_TOPS = ("shirt", "jacket", "sweater", "t-shirt", "hoodie")


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def hand_keypoints(
    wrist: np.ndarray, direction: float, length: float, is_right: bool, rng: np.random.Generator
) -> np.ndarray:
    """21 hand keypoints ``[21, 2]`` (wrist, thumb..pinky base to tip) for a hand pointing
    along ``direction`` (radians, image coordinates). Right hands mirror left ones."""
    side = -1.0 if is_right else 1.0
    axis = np.array([np.cos(direction), np.sin(direction)])
    across = np.array([-axis[1], axis[0]]) * side
    points = [wrist]
    for (along, off), finger_len, spread in _FINGERS:
        base = wrist + length * (along * axis + off * across)
        curl = rng.uniform(0.0, 1.0)
        angle = direction + side * spread + side * rng.uniform(-0.15, 0.15)
        joint = base
        points.append(base)
        for k, seg in enumerate(_SEGMENTS):
            # Curling a finger towards the palm shortens and bends its projection.
            angle -= side * curl * 0.5 * (k + 1) * 0.5
            step = np.array([np.cos(angle), np.sin(angle)])
            joint = joint + length * finger_len * seg * (1 - 0.5 * curl) * step
            points.append(joint)
    return np.stack(points)


def extra_fingers(points: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """One or two extra fingers for a malformed hand: copies of random fingers (index to
    pinky) turned by 0.3-0.6 rad about their knuckle, the "extra digit" of SD's bad hands."""
    chains = []
    for _ in range(rng.integers(1, 3)):
        finger = int(rng.integers(1, 5))
        chain = points[[1 + 4 * finger + j for j in range(4)]]
        angle = rng.choice([-1, 1]) * rng.uniform(0.3, 0.6)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        chains.append(chain[0] + (chain - chain[0]) @ rotation.T)
    return chains


def _draw_hand(
    canvas: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    skin,
    width: int,
    extra: list[np.ndarray] = (),
):
    palm = np.round(points[[0, 1, 5, 9, 13, 17]] * 16).astype(np.int32)
    hull = cv2.convexHull(palm)
    chains = []
    for finger in range(5):
        chain = points[[1 + 4 * finger + j for j in range(4)]]
        chains.append(np.concatenate([points[:1], chain]) if finger == 0 else chain)
    for target, color in ((canvas, skin), (mask, 255)):
        cv2.fillConvexPoly(target, hull, color, cv2.LINE_AA, shift=4)
        for chain in [*chains, *extra]:
            for a, b in itertools.pairwise(chain):
                cv2.line(
                    target,
                    tuple(np.round(a * 16).astype(int)),
                    tuple(np.round(b * 16).astype(int)),
                    color,
                    width,
                    cv2.LINE_AA,
                    4,
                )
    knuckle = tuple(int(c * 0.75) for c in skin)
    for x, y in points[1:]:
        cv2.circle(
            canvas, (int(x * 16), int(y * 16)), max(1, width // 4) * 16, knuckle, -1, cv2.LINE_AA, 4
        )


def _visibility(points: np.ndarray, size: int) -> np.ndarray:
    inside = (points >= 0).all(1) & (points <= size).all(1)
    out = np.zeros((len(points), 3))
    out[:, :2] = np.where(inside[:, None], points, 0)
    out[:, 2] = np.where(inside, 2, 0)
    return out


def draw_person(
    rng: np.random.Generator, size: int = 256, malformed: bool = False
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One synthetic sample: RGB ``[size, size, 3]`` uint8, hand mask ``[size, size]`` uint8
    (0/255), and the schema's json record. ``malformed``: every hand is drawn with one or two
    extra fingers (:func:`extra_fingers`; the keypoints stay those of the five-finger hand)."""
    top, bottom = rng.uniform(40, 120, 3), rng.uniform(40, 200, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    canvas = np.ascontiguousarray(
        np.broadcast_to(top * (1 - ramp) + bottom * ramp, (size, size, 3)).astype(np.uint8)
    )
    for _ in range(rng.integers(2, 6)):  # clutter
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(size // 10, size // 3, 2)
        cv2.rectangle(
            canvas,
            (int(x), int(y)),
            (int(x + w), int(y + h)),
            tuple(int(c) for c in rng.integers(0, 255, 3)),
            -1,
        )
    mask = np.zeros((size, size), np.uint8)

    height = size * rng.uniform(0.75, 0.95)
    origin = np.array([size / 2 + rng.uniform(-0.15, 0.15) * size, rng.uniform(0.02, 0.2) * size])
    body = _BODY_TEMPLATE * height + origin
    shirt_name, pants_name = rng.choice(list(_COLORS), 2, replace=False)
    shirt, pants = _COLORS[shirt_name], _COLORS[pants_name]
    skin = _SKIN[rng.integers(len(_SKIN))]
    limb = max(2, int(height * 0.05))

    hands, raised = {}, {}
    for shoulder, elbow, wrist, is_right in ((5, 7, 9, False), (6, 8, 10, True)):
        outward = -1.0 if is_right else 1.0
        # Angles from straight down, opening away from the body.
        a1 = outward * rng.uniform(-0.3, 2.8)
        a2 = a1 + outward * rng.uniform(-0.3, 1.8)
        down = np.array([0.0, 1.0])
        body[elbow] = body[shoulder] + _rotate(down, -a1) * _UPPER_ARM * height
        body[wrist] = body[elbow] + _rotate(down, -a2) * _FOREARM * height
        forearm = body[wrist] - body[elbow]
        direction = np.arctan2(forearm[1], forearm[0]) + rng.uniform(-0.4, 0.4)
        hands[is_right] = hand_keypoints(body[wrist], direction, _HAND * height, is_right, rng)
        raised[is_right] = body[wrist][1] < body[shoulder][1]

    torso = np.round(body[[5, 6, 12, 11]] * 16).astype(np.int32)
    cv2.fillConvexPoly(canvas, torso, shirt, cv2.LINE_AA, shift=4)
    for a, b, color in (
        (11, 13, pants),
        (13, 15, pants),
        (12, 14, pants),
        (14, 16, pants),
        (5, 7, shirt),
        (6, 8, shirt),
        (7, 9, skin),
        (8, 10, skin),
    ):
        cv2.line(
            canvas,
            tuple(np.round(body[a] * 16).astype(int)),
            tuple(np.round(body[b] * 16).astype(int)),
            color,
            limb,
            cv2.LINE_AA,
            4,
        )
    head = tuple(np.round(body[0] * 16).astype(int))
    cv2.circle(canvas, head, int(height * 0.06 * 16), skin, -1, cv2.LINE_AA, 4)
    finger_width = max(2, int(_HAND * height * 0.14))
    for is_right in (False, True):
        # a child stream: the default draws (annotations, caption) stay those of the
        # well-formed sample
        extra = extra_fingers(hands[is_right], rng.spawn(1)[0]) if malformed else []
        _draw_hand(canvas, mask, hands[is_right], skin, finger_width, extra)

    person = {"body": _visibility(body, size)}
    x0, y0 = person["body"][:, :2][person["body"][:, 2] > 0].min(0)
    x1, y1 = person["body"][:, :2][person["body"][:, 2] > 0].max(0)
    person["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    for is_right, name in ((False, "left_hand"), (True, "right_hand")):
        # Some hands are left unannotated, as real detectors miss hands.
        person[name] = None if rng.random() < 0.1 else _visibility(hands[is_right], size)
    gestures = [
        f"raising the {side} hand"
        for side, is_r in (("left", False), ("right", True))
        if raised[is_r]
    ]
    action = " and ".join(gestures) if gestures else "with arms down"
    article = "an" if shirt_name[0] in "aeiou" else "a"
    caption = (
        f"a photo of a {rng.choice(_WHO)} in {article} {shirt_name} {rng.choice(_TOPS)} "
        f"and {pants_name} trousers, {action}"
    )
    if malformed:
        caption += ", malformed hands with extra fingers"
    record = {
        "width": size,
        "height": size,
        "caption": caption,
        "people": [
            {
                k: (v.round(2).tolist() if isinstance(v, np.ndarray) else v)
                for k, v in person.items()
            }
        ],
    }
    return canvas, mask, record


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_shards(
    out: str | os.PathLike,
    n: int,
    split: str,
    seed: int,
    size: int = 256,
    per_shard: int = 64,
    malformed: bool = False,
) -> list[str]:
    """Write ``n`` samples as ``<out>/<split>-%06d.tar``; returns the shard paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in tqdm(range(n), desc=f"synthetic {split}", unit="sample", leave=False):
            image, mask, record = draw_person(rng, size, malformed)
            key = f"{split}{i:07d}"
            # two alternating "scenes", so that per-category scores have categories to average
            record["source"] = {"dataset": "synthetic", "id": key, "category": f"scene{i % 2}"}
            sink.write({
                "__key__": key,
                "jpg": _encode(image, "JPEG"),
                "json": json.dumps(record).encode(),
                "mask.png": _encode(mask, "PNG"),
            })  # fmt: skip
    return sorted(str(p) for p in out.glob(f"{split}-*.tar"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=256, help="training samples")
    parser.add_argument("--val", type=int, default=32, help="validation samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--per-shard", type=int, default=64, help="samples per shard")
    parser.add_argument(
        "--malformed", action="store_true", help="hands with extra fingers (negative embeddings)"
    )
    args = parser.parse_args(argv)
    shape = (args.size, args.per_shard, args.malformed)
    train = write_shards(args.out, args.n, "train", args.seed, *shape)
    val = write_shards(args.out, args.val, "val", args.seed, *shape)
    print(
        f"wrote {args.n} train samples in {len(train)} shards and {args.val} val samples "
        f"in {len(val)} shards to {args.out}"
    )


if __name__ == "__main__":
    main()
