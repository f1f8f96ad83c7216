"""Turn a folder of photos into schema shards with MediaPipe's bundled models (offline).

    python -m datamodules.annotate --images DIR --out SHARDS [--processes 2]

Per image: body keypoints (BlazePose 33 -> COCO-17, the mapping of the metrics' backend;
scores in [0, 1] as ``v``), both hands' 21 keypoints (assigned to the left/right wrist they are
closest to), a hand mask (each hand's landmark hull, dilated, intersected with the person's
selfie-segmentation mask), and the caption from a sidecar ``<name>.txt`` (else
``--default-caption``). Images that cannot be read or show no person are dropped and counted.
MediaPipe finds one person per image.
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
from metrics.pose_estimators import BLAZEPOSE_TO_COCO

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LEFT_WRIST, RIGHT_WRIST = 9, 10
MODELS_BY_PROCESS: dict = {}


def mediapipe_models():
    """One set of MediaPipe graphs per process (they do not pickle)."""
    if not MODELS_BY_PROCESS:
        import mediapipe as mp

        MODELS_BY_PROCESS["pose"] = mp.solutions.pose.Pose(
            static_image_mode=True, model_complexity=1
        )
        MODELS_BY_PROCESS["hands"] = mp.solutions.hands.Hands(
            static_image_mode=True, max_num_hands=2
        )
        MODELS_BY_PROCESS["segmentation"] = mp.solutions.selfie_segmentation.SelfieSegmentation(
            model_selection=0
        )
    return MODELS_BY_PROCESS


def keypoints_from_landmarks(landmarks, width: int, height: int, scores) -> np.ndarray:
    """Landmarks -> ``[K, 3]`` pixels + score; points off the image become unlabelled."""
    kp = np.array([[p.x * width, p.y * height, s] for p, s in zip(landmarks, scores, strict=True)])
    return unlabel_off_image(kp, width, height)


def nearest_wrist(body: np.ndarray, hand: np.ndarray) -> str | None:
    """``"left"``/``"right"``: the body wrist closest to the hand's wrist (None: no wrist)."""
    distances = {
        side: np.linalg.norm(body[k, :2] - hand[0, :2])
        for side, k in (("left", LEFT_WRIST), ("right", RIGHT_WRIST))
        if body[k, 2] > 0
    }
    return min(distances, key=distances.get) if distances else None


def mediapipe_hands(
    pixels: np.ndarray, bodies: list[np.ndarray]
) -> tuple[list[dict], list[np.ndarray]]:
    """MediaPipe's hands on an RGB image, each assigned to the person and side whose wrist is
    nearest. Returns one ``{"left_hand": [21, 3] | None, "right_hand": ...}`` per body
    ``[17, 3]`` and every detected hand (assigned or not)."""
    height, width = pixels.shape[:2]
    out = [{"left_hand": None, "right_hand": None} for _ in bodies]
    detected = []
    result = mediapipe_models()["hands"].process(pixels)
    for hand_landmarks, handedness in zip(
        result.multi_hand_landmarks or [], result.multi_handedness or [], strict=True
    ):
        score = handedness.classification[0].score
        hand = keypoints_from_landmarks(hand_landmarks.landmark, width, height, [score] * 21)
        detected.append(hand)
        best = None
        for n, body in enumerate(bodies):
            side = nearest_wrist(body, hand)
            if side is None:
                continue
            wrist = body[LEFT_WRIST if side == "left" else RIGHT_WRIST, :2]
            distance = np.linalg.norm(wrist - hand[0, :2])
            if best is None or distance < best[0]:
                best = (distance, n, side + "_hand")
        if best is not None and out[best[1]][best[2]] is None:
            out[best[1]][best[2]] = hand
    return out, detected


def people_with_hands(pixels: np.ndarray, bodies: list[np.ndarray]) -> list[dict]:
    """Schema people for given COCO-17 ``bodies``, with MediaPipe's hands assigned to them and
    a bounding box of each body's labelled keypoints."""
    hands, _ = mediapipe_hands(pixels, bodies)
    people = []
    for body, hand in zip(bodies, hands, strict=True):
        labelled = body[body[:, 2] > 0, :2]
        (x0, y0), (x1, y1) = labelled.min(0), labelled.max(0)
        people.append({
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "body": body.tolist(),
            **{k: (None if v is None else v.tolist()) for k, v in hand.items()},
        })  # fmt: skip
    return people


def annotate_image(pixels: np.ndarray, hand_dilation: int = 4) -> dict | None:
    """MediaPipe annotation of one RGB image ``[H, W, 3]`` uint8: ``{"person": schema person,
    "mask": [H, W] uint8}``, or None when no person is found."""
    height, width = pixels.shape[:2]
    models = mediapipe_models()
    pose = models["pose"].process(pixels)
    if pose.pose_landmarks is None:
        return None
    landmarks = [pose.pose_landmarks.landmark[i] for i in BLAZEPOSE_TO_COCO]
    body = keypoints_from_landmarks(landmarks, width, height, [p.visibility for p in landmarks])
    (assigned,), detected = mediapipe_hands(pixels, [body])
    person = {"body": body, **assigned}
    segmentation = models["segmentation"].process(pixels).segmentation_mask > 0.5
    mask = np.zeros((height, width), np.uint8)
    for hand in detected:
        mask |= hull_mask(hand, (width, height), hand_dilation)
    mask &= segmentation.astype(np.uint8) * 255
    labelled = body[body[:, 2] > 0, :2]
    x0, y0 = labelled.min(0) if len(labelled) else (0, 0)
    x1, y1 = labelled.max(0) if len(labelled) else (0, 0)
    person["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    return {"person": person, "mask": mask}


def image_sample(path: Path, default_caption: str = "a photo of a person") -> dict | Drop:
    """One schema sample for the image at ``path``."""
    pixels = read_rgb(path)
    if isinstance(pixels, Drop):
        return pixels
    annotation = annotate_image(pixels)
    if annotation is None:
        return Drop("no_person")
    sidecar = path.with_suffix(".txt")
    caption = sidecar.read_text().strip() if sidecar.is_file() else default_caption
    person = {
        k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in annotation["person"].items()
    }
    height, width = pixels.shape[:2]
    record = {
        "width": width,
        "height": height,
        "caption": caption,
        "source": {"dataset": "annotate", "id": path.name},
        "people": [person],
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
    parser.add_argument("--default-caption", default="a photo of a person")
    args = parser.parse_args(argv)
    files = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--images {args.images!r}: no images found")
    return convert_from_args(
        files,
        lambda p: str(p.relative_to(args.images)),
        partial(image_sample, default_caption=args.default_caption),
        args,
        desc="annotating",
    )


if __name__ == "__main__":
    main()
