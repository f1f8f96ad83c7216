"""HaGRID (v1 and v2) -> schema shards.

    python -m datamodules.convert_hagrid --src HAGRID_ROOT --out SHARDS [--processes 4]

Expected layout (https://github.com/hukenovs/hagrid; v2 on its ``Hagrid_v2`` branch):

    HAGRID_ROOT/annotations/**/<gesture>.json   (v1: ann_train_val/<gesture>.json also found)
    HAGRID_ROOT/<images dir>/**/<image id>.jpg  (any sub-folder layout: found by image id)

Each annotation file maps an image id (file name without extension) to ``bboxes`` (normalised
``[x, y, w, h]``), ``labels`` (gesture per box, ``no_gesture`` for a free hand), ``user_id``
and, in v1, ``leading_hand`` (``left``/``right``: the gesture hand); v2 adds ``hand_landmarks``
(per box, 21 normalised ``[x, y]`` or an empty list). Boxes without landmarks get MediaPipe's
(the hand nearest the box's centre in a crop twice its size), flagged in
``source.landmarks_from``. The body is the person the offline people estimator
(:class:`pose_estimation.MediaPipePeople`) finds whom most of the hands are attributed to, and
unlabelled when they fit nobody (``source.body_from``). Handedness: v1's ``leading_hand`` for
gesture boxes (the other side for ``no_gesture`` boxes), else the side of the body wrist the
hand is attributed to, else MediaPipe's handedness (its labels assume mirrored images, so they
are swapped for photos). Caption: "a person showing a <gesture> gesture".
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.annotate import people_estimator
from datamodules.converter import (
    Drop,
    add_engine_arguments,
    convert_from_args,
    encode_jpeg,
    read_rgb,
    unlabel_off_image,
)
from pose_estimation.attribution import attribute_hands


@dataclass
class HagridItem:
    image_id: str
    gesture: str
    annotation: dict
    image_path: Path | None


def caption_for(labels: list[str]) -> str:
    gestures = [label for label in labels if label != "no_gesture"]
    if not gestures:
        return "a person with relaxed hands"
    return f"a person showing a {gestures[0].replace('_', ' ')} gesture"


def _owner(bodies: list[np.ndarray], hands: list[np.ndarray]) -> tuple[np.ndarray, dict]:
    """The detected body the annotated ``hands`` belong to (the one most of them are attributed
    to) and each hand's side on it; unlabelled when no hand fits any body (HaGRID photos show
    bystanders too: a body is only taken when the hands say whose it is)."""
    owners = attribute_hands(bodies, hands)
    votes = Counter(n for n, _ in owners.values())
    if not votes:
        return np.zeros((17, 3)), {}
    best = votes.most_common(1)[0][0]
    return bodies[best], {h: side for h, (n, side) in owners.items() if n == best}


def hagrid_sample(item: HagridItem) -> dict | Drop:
    if item.image_path is None:
        return Drop("missing_image")
    pixels = read_rgb(item.image_path)
    if isinstance(pixels, Drop):
        return pixels
    height, width = pixels.shape[:2]
    ann = item.annotation
    boxes, labels = ann.get("bboxes", []), ann.get("labels", [])
    if not boxes or len(boxes) != len(labels):
        return Drop("bad_annotation")
    landmarks = ann.get("hand_landmarks") or [[] for _ in boxes]
    found = []  # (label, keypoints, MediaPipe's side or None)
    landmarks_from = []
    for box, label, marks in zip(boxes, labels, landmarks, strict=False):
        if marks and len(marks) == 21:
            kp = np.array([[mx * width, my * height, 2.0] for mx, my in marks])
            found.append((label, kp, None))
            landmarks_from.append("annotation")
            continue
        hand = people_estimator().hands_in_box(
            pixels, [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
        )
        landmarks_from.append("none" if hand is None else "mediapipe")
        if hand is not None:
            found.append((label, hand.keypoints, hand.side))
    if not found:
        return Drop("no_hand_landmarks")
    bodies = [np.asarray(p["body"]) for p in people_estimator().bodies(pixels)]
    body, body_sides = _owner(bodies, [kp for _, kp, _ in found])
    leading = ann.get("leading_hand")
    hands: dict[str, np.ndarray] = {}
    for n, (label, kp, mp_side) in enumerate(found):
        if leading in ("left", "right"):
            side = leading if label != "no_gesture" else {"left": "right", "right": "left"}[leading]
        else:
            side = body_sides.get(n) or mp_side or ("right" if hands else "left")
        if side not in hands:  # two hands claiming one side: keep the first
            hands[side] = unlabel_off_image(kp, width, height)
    body = unlabel_off_image(body, width, height)
    union = np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in boxes])
    x0, y0 = union[:, :2].min(0) * (width, height)
    x1, y1 = union[:, 2:].max(0) * (width, height)
    person = {
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "body": body.tolist(),
        "left_hand": hands["left"].tolist() if "left" in hands else None,
        "right_hand": hands["right"].tolist() if "right" in hands else None,
    }
    record = {
        "width": width, "height": height, "caption": caption_for(labels),
        "source": {"dataset": "hagrid", "id": item.image_id, "gesture": item.gesture,
                   "user_id": ann.get("user_id"), "version": 2 if "hand_landmarks" in ann else 1,
                   "landmarks_from": landmarks_from,
                   "body_from": "mediapipe" if (body[:, 2] > 0).any() else "none"},
        "people": [person],
    }  # fmt: skip
    return {
        "__key__": item.image_id,
        "jpg": encode_jpeg(pixels),
        "json": json.dumps(record).encode(),
    }


def list_items(src: Path) -> list[HagridItem]:
    """Every annotated image of a HaGRID root, in a stable order."""
    files = sorted(src.rglob("*.json"))
    images = {p.stem: p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")}
    items = []
    for file in files:
        annotations = json.loads(file.read_text())
        if not isinstance(annotations, dict):
            continue
        for image_id in sorted(annotations):
            ann = annotations[image_id]
            if isinstance(ann, dict) and "bboxes" in ann:
                items.append(HagridItem(image_id, file.stem, ann, images.get(image_id)))
    return items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="HaGRID root (annotations + images)")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    items = list_items(Path(args.src))
    if not items:
        raise SystemExit(f"--src {args.src!r}: no HaGRID annotation files (*.json) found")
    # split by subject, as HaGRID's own splits are, so one person is never in both
    return convert_from_args(
        items,
        lambda i: i.annotation.get("user_id") or i.image_id,
        hagrid_sample,
        args,
        desc="hagrid",
    )


if __name__ == "__main__":
    main()
