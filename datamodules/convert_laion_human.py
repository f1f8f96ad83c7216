"""LAION-Human as HumanSD released it -> schema shards.

    python -m datamodules.convert_laion_human --src LAION_HUMAN_ROOT --out SHARDS --trust-pickle

Expected layout (https://github.com/IDEA-Research/HumanSD, "LAION-Human"):

    LAION_HUMAN_ROOT/mapping_file_training.json   {id: {"img_path", "pose_path", "prompt"}}
    LAION_HUMAN_ROOT/<img_path>, LAION_HUMAN_ROOT/<pose_path>   (paths as in the mapping)

Each pose file is an ``.npz`` whose ``arr_0`` is an object array of per-person dicts with
``"keypoints"`` ``[17, 3]`` (COCO-17, x, y, score). Reading object arrays needs
``allow_pickle=True``, and unpickling runs code from the file, so this converter does it only
with ``--trust-pickle`` and never unpickles anything else. Hands come from the offline people
estimator, attributed to the labelled people (:func:`datamodules.annotate.people_with_hands`).
"""

from __future__ import annotations

import argparse
import json
import pickle
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
class LaionItem:
    key: str
    image_path: Path
    pose_path: Path
    prompt: str


def laion_sample(item: LaionItem, settings: dict = MEDIAPIPE) -> dict | Drop:
    pixels = read_rgb(item.image_path)
    if isinstance(pixels, Drop):
        return pixels
    height, width = pixels.shape[:2]
    try:
        people = np.load(item.pose_path, allow_pickle=True)["arr_0"]
        bodies = [
            unlabel_off_image(np.reshape(p["keypoints"], (17, 3)), width, height) for p in people
        ]
    except (OSError, KeyError, ValueError, TypeError, pickle.UnpicklingError):
        return Drop("bad_pose_file")
    bodies = [b for b in bodies if (b[:, 2] > 0).any()]
    if not bodies:
        return Drop("no_person")
    record = {
        "width": width,
        "height": height,
        "caption": item.prompt,
        "source": {"dataset": "laion-human", "id": item.key, "hands_from": settings},
        "people": people_with_hands(pixels, bodies, settings),
    }
    return {"__key__": item.key, "jpg": encode_jpeg(pixels), "json": json.dumps(record).encode()}


def list_items(src: Path, mapping: str) -> list[LaionItem]:
    entries = json.loads((src / mapping).read_text())
    return [
        LaionItem(str(key), src / v["img_path"], src / v["pose_path"], v.get("prompt", ""))
        for key, v in sorted(entries.items())
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True)
    parser.add_argument("--mapping", default="mapping_file_training.json")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling the pose .npz files (they run code when loaded)",
    )
    add_engine_arguments(parser)
    add_estimator_arguments(parser)
    args = parser.parse_args(argv)
    if not args.trust_pickle:
        raise SystemExit(
            "LAION-Human's pose files are pickled object arrays: loading them runs code stored "
            "in the files. Pass --trust-pickle if you trust their source (HumanSD's release)."
        )
    items = list_items(Path(args.src), args.mapping)
    return convert_from_args(
        items,
        lambda i: i.key,
        partial(laion_sample, settings=estimator_settings(args)),
        args,
        desc="laion-human",
    )


if __name__ == "__main__":
    main()
