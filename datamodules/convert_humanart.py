"""Human-Art -> schema shards.

    python -m datamodules.convert_humanart --src HUMANART_ROOT --annotations FILE.json --out SHARDS

Expected layout (https://github.com/IDEA-Research/HumanArt): a COCO-style keypoint file
(``images`` with ``id``, ``file_name``, ``width``, ``height`` and the text ``description`` and
scene ``category``; ``annotations`` with 17 COCO keypoints per person) and the images under
``HUMANART_ROOT/<file_name>``. Caption: the description, else "a <category> image of people".
Hands come from the offline people estimator (:class:`pose_estimation.MediaPipePeople`: whole
image and crops around each labelled wrist; ``--rtmlib-pose`` for rtmlib), attributed to the
labelled people by wrist and forearm; hands that fit no labelled person are kept as hand-only
entries (no body keypoints, so pose metrics skip them); ``source.hands_from`` records the
estimator. Persons without a labelled keypoint
are left out.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from datamodules.annotate import (
    MEDIAPIPE,
    add_estimator_arguments,
    estimator_settings,
    people_with_hands,
)
from datamodules.converter import (
    Drop,
    add_engine_arguments,
    convert_from_args,
    encode_jpeg,
    read_rgb,
    unlabel_off_image,
)


@dataclass
class HumanArtItem:
    key: str
    image_path: Path
    caption: str
    category: str
    keypoints: list[list[float]]


def humanart_sample(item: HumanArtItem, settings: dict = MEDIAPIPE) -> dict | Drop:
    pixels = read_rgb(item.image_path)
    if isinstance(pixels, Drop):
        return pixels
    height, width = pixels.shape[:2]
    bodies = [unlabel_off_image(np.reshape(k, (17, 3)), width, height) for k in item.keypoints]
    bodies = [b for b in bodies if (b[:, 2] > 0).any()]
    if not bodies:
        return Drop("no_person")
    record = {
        "width": width,
        "height": height,
        "caption": item.caption,
        "source": {
            "dataset": "human-art",
            "id": item.key,
            "category": item.category,
            "hands_from": settings,
        },
        "people": people_with_hands(pixels, bodies, settings),
    }
    return {"__key__": item.key, "jpg": encode_jpeg(pixels), "json": json.dumps(record).encode()}


def list_items(src: Path, annotations: Path) -> list[HumanArtItem]:
    coco = json.loads(annotations.read_text())
    by_image = defaultdict(list)
    for ann in coco.get("annotations", []):
        by_image[ann["image_id"]].append(ann["keypoints"])
    items = []
    for image in sorted(coco["images"], key=lambda im: im["id"]):
        category = str(image.get("category", "")).replace("_", " ")
        caption = image.get("description") or f"a {category or 'photo'} image of people"
        items.append(
            HumanArtItem(
                f"humanart{image['id']:09d}",
                src / image["file_name"],
                caption,
                category,
                by_image.get(image["id"], []),
            )
        )
    return items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="root the images' file_name is under")
    parser.add_argument("--annotations", required=True, help="COCO-style keypoint json")
    add_engine_arguments(parser, val_fraction=0.0)
    add_estimator_arguments(parser)
    args = parser.parse_args(argv)
    items = list_items(Path(args.src), Path(args.annotations))
    return convert_from_args(
        items,
        lambda i: i.key,
        partial(humanart_sample, settings=estimator_settings(args)),
        args,
        desc="human-art",
    )


if __name__ == "__main__":
    main()
