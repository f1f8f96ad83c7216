"""Turn a folder of photos into schema shards with a people estimator (offline by default).

    python -m datamodules.annotate --images DIR --out SHARDS [--processes 2]
        [--rtmlib-pose RTMW.onnx --rtmlib-det YOLOX.onnx --rtmlib-input-size 288 384]

Per image, every person the estimator finds (:class:`pose_estimation.MediaPipePeople` with
the models shipped in the mediapipe wheel, or :class:`pose_estimation.RTMLibPeople` with
local RTMW / DWPose / RTMPose / RTMO weights): COCO-17 body keypoints (scores in [0, 1] as
``v``), both hands' 21 keypoints on the person they belong to, hands that belong to no
detected person as hand-only entries (body all unlabelled), a hand mask (each hand's landmark
hull, dilated, intersected with MediaPipe's selfie-segmentation mask of people), and the
caption from a sidecar ``<name>.txt`` (else ``--default-caption``). Images that cannot be read
or show neither a person nor a hand are dropped and counted. ``source.estimator`` records the
estimator's settings (backend, model files, input size).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np

from datamodules.converter import (
    Drop,
    add_engine_arguments,
    convert_from_args,
    encode_jpeg,
    encode_png,
    read_rgb,
    unlabel_off_image,
)
from datamodules.rendering import hull_mask
from pose_estimation import MediaPipePeople, PeopleEstimator, RTMLibPeople
from pose_estimation.native_logs import start_up_notices_hidden

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MEDIAPIPE = {"backend": "mediapipe"}
MODELS_BY_PROCESS: dict = {}


def add_estimator_arguments(parser: argparse.ArgumentParser) -> None:
    """Options choosing the people estimator (MediaPipe unless an rtmlib pose model is given)."""
    parser.add_argument("--rtmlib-pose", help="local RTMW/DWPose/RTMPose/RTMO .onnx")
    parser.add_argument("--rtmlib-det", help="local YOLOX .onnx (top-down models)")
    parser.add_argument("--rtmlib-model", choices=("rtmpose", "rtmo"), default="rtmpose")
    parser.add_argument(
        "--rtmlib-input-size", type=int, nargs=2, default=None, metavar=("A", "B"),
        help="the pose model's input in rtmlib's order: RTMPose/RTMW/DWPose width height "
        "(default 288 384), RTMO height width (default 640 640)",
    )  # fmt: skip


def estimator_settings(args: argparse.Namespace) -> dict:
    if not args.rtmlib_pose:
        return MEDIAPIPE
    return {
        "backend": "rtmlib",
        "pose": args.rtmlib_pose,
        "det": args.rtmlib_det,
        "model": args.rtmlib_model,
        "pose_input_size": tuple(
            args.rtmlib_input_size or ((640, 640) if args.rtmlib_model == "rtmo" else (288, 384))
        ),
    }


def people_estimator(settings: dict = MEDIAPIPE) -> PeopleEstimator:
    """One estimator per process and settings (MediaPipe graphs and ONNX sessions do not
    pickle into workers)."""
    key = json.dumps(settings, sort_keys=True)
    if key not in MODELS_BY_PROCESS:
        params = {k: v for k, v in settings.items() if k != "backend"}
        backend = {"mediapipe": MediaPipePeople, "rtmlib": RTMLibPeople}[settings["backend"]]
        MODELS_BY_PROCESS[key] = backend(**params)
    return MODELS_BY_PROCESS[key]


def person_segmentation(pixels: np.ndarray) -> np.ndarray:
    """MediaPipe's selfie segmentation of people, ``[H, W]`` bool."""
    if "segmentation" not in MODELS_BY_PROCESS:
        import mediapipe as mp

        with start_up_notices_hidden():  # the graph prints them on its first image
            graph = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            MODELS_BY_PROCESS["segmentation"] = graph
            return graph.process(pixels).segmentation_mask > 0.5
    return MODELS_BY_PROCESS["segmentation"].process(pixels).segmentation_mask > 0.5


def schema_people(people: list[dict], width: int, height: int) -> list[dict]:
    """Estimator people -> schema people (lists; points off the image unlabelled; bbox of the
    labelled points)."""
    out = []
    for person in people:
        body = unlabel_off_image(person["body"], width, height)
        hands = {
            k: None if person[k] is None else unlabel_off_image(person[k], width, height)
            for k in ("left_hand", "right_hand")
        }
        labelled = [p[p[:, 2] > 0, :2] for p in (body, *hands.values()) if p is not None]
        points = np.concatenate(labelled)
        if len(points) == 0:
            continue
        (x0, y0), (x1, y1) = points.min(0), points.max(0)
        out.append({
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "body": body.tolist(),
            **{k: None if v is None else v.tolist() for k, v in hands.items()},
        })  # fmt: skip
    return out


def people_with_hands(
    pixels: np.ndarray, bodies: list[np.ndarray], settings: dict = MEDIAPIPE
) -> list[dict]:
    """Schema people for a dataset's labelled COCO-17 ``bodies`` ``[17, 3]`` (in that order),
    with the hands the estimator finds attributed to them, then the hands that fit none as
    hand-only entries (no body keypoints: pose metrics skip them)."""
    height, width = pixels.shape[:2]
    return schema_people(people_estimator(settings).hands_on(pixels, bodies), width, height)


def annotate_image(pixels: np.ndarray, settings: dict = MEDIAPIPE, hand_dilation: int = 4) -> dict:
    """Annotation of one RGB image ``[H, W, 3]`` uint8: ``{"people": schema people (every
    person and hand-only entry), "mask": [H, W] uint8}``."""
    height, width = pixels.shape[:2]
    people = schema_people(people_estimator(settings).people(pixels), width, height)
    mask = np.zeros((height, width), np.uint8)
    for person in people:
        for hand in (person["left_hand"], person["right_hand"]):
            if hand is not None:
                mask |= hull_mask(np.asarray(hand), (width, height), hand_dilation)
    if mask.any():
        mask &= person_segmentation(pixels).astype(np.uint8) * 255
    return {"people": people, "mask": mask}


def image_sample(
    path: Path, default_caption: str = "a photo of a person", settings: dict = MEDIAPIPE
) -> dict | Drop:
    """One schema sample for the image at ``path``."""
    pixels = read_rgb(path)
    if isinstance(pixels, Drop):
        return pixels
    annotation = annotate_image(pixels, settings)
    if not annotation["people"]:
        return Drop("no_person")
    sidecar = path.with_suffix(".txt")
    caption = sidecar.read_text().strip() if sidecar.is_file() else default_caption
    height, width = pixels.shape[:2]
    record = {
        "width": width,
        "height": height,
        "caption": caption,
        "source": {"dataset": "annotate", "id": path.name, "estimator": settings},
        "people": annotation["people"],
    }
    return {
        "__key__": path.stem,
        "jpg": encode_jpeg(pixels),
        "json": json.dumps(record).encode(),
        "mask.png": encode_png(annotation["mask"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of photos (searched recursively)")
    add_engine_arguments(parser)
    add_estimator_arguments(parser)
    parser.add_argument("--default-caption", default="a photo of a person")
    args = parser.parse_args(argv)
    files = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--images {args.images!r}: no images found")
    return convert_from_args(
        files,
        lambda p: str(p.relative_to(args.images)),
        partial(
            image_sample, default_caption=args.default_caption, settings=estimator_settings(args)
        ),
        args,
        desc="annotating",
    )


if __name__ == "__main__":
    main()
