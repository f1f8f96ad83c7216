"""The one sample schema every converter writes and every datamodule reads (README: "Real
weights and data").

A raw WebDataset sample is a dict of bytes keyed by extension (``jpg``/``png``, ``json``,
optional ``mask.png`` and ``txt``). :func:`decode_sample` turns it into a :class:`Sample`
or raises :class:`SampleError` whose ``reason`` is one of :data:`SKIP_REASONS`, so that the
reader can skip the sample and count why.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

BODY_KEYPOINTS = 17
HAND_KEYPOINTS = 21
HANDS = ("left_hand", "right_hand")

# Order matters: batches carry skip counts as a vector in this order.
SKIP_REASONS = (
    "missing_key",
    "bad_image",
    "bad_json",
    "bad_schema",
    "bad_keypoints",
    "keypoints_off_image",
    "bad_mask",
    "bad_key",
    "unreadable_shard",  # counted once per shard read that failed; the rest of it is skipped
    "too_small",  # an image, or a hand (one count per hand), below the configured minimum
)
MIN_IMAGE_SIZE = 32  # px, the shorter side; smaller images are not training material
MAX_KEY_LENGTH = 200  # leaves room for suffixes such as "_hand3_skeleton.png" in a file name


class SampleError(ValueError):
    """A sample that does not follow the schema; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Person:
    bbox: tuple[float, float, float, float]
    body: np.ndarray  # [17, 3] (x, y, v), pixels of the stored image
    left_hand: np.ndarray | None = None  # [21, 3] or None
    right_hand: np.ndarray | None = None


def person_area(person: Person) -> float:
    """Area of the box of a person's labelled keypoints, body and hands: the OKS scale its hands
    are scored with (COCO-WholeBody scores hands with the whole person's area)."""
    parts = [person.body] + [h for h in (person.left_hand, person.right_hand) if h is not None]
    points = np.concatenate([p[p[:, 2] > 0, :2] for p in parts])
    if len(points) < 2:
        return 0.0
    width, height = points.max(0) - points.min(0)
    return float(width * height)


@dataclass
class Sample:
    key: str
    url: str
    image: Image.Image  # RGB
    caption: str
    source: dict
    people: list[Person] = field(default_factory=list)
    mask: np.ndarray | None = None  # [H, W] uint8 hand mask, 0 or 255

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _keypoints(value, count: int, name: str, width: int, height: int) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SampleError("bad_keypoints", f"{name} is not numeric: {exc}") from None
    if array.shape != (count, 3):
        raise SampleError(
            "bad_keypoints", f"{name} has shape {list(array.shape)}, expected [{count}, 3]"
        )
    if not np.isfinite(array).all():
        raise SampleError("bad_keypoints", f"{name} has non-finite values")
    if (array[:, 2] < 0).any():
        raise SampleError("bad_keypoints", f"{name} has negative visibility")
    labelled = array[array[:, 2] > 0]
    off = (
        (labelled[:, 0] < 0)
        | (labelled[:, 0] > width)
        | (labelled[:, 1] < 0)
        | (labelled[:, 1] > height)
    )
    if off.any():
        x, y = labelled[off][0, :2]
        raise SampleError(
            "keypoints_off_image", f"{name} has ({x:.1f}, {y:.1f}) outside {width}x{height}"
        )
    return array


def parse_people(people: object, width: int, height: int) -> list[Person]:
    """Validate the ``people`` list of the json record against the schema."""
    if not isinstance(people, list):
        raise SampleError("bad_schema", "'people' must be a list")
    parsed = []
    for i, person in enumerate(people):
        if not isinstance(person, dict):
            raise SampleError("bad_schema", f"people[{i}] must be an object")
        for key in ("bbox", "body"):
            if key not in person:
                raise SampleError("bad_schema", f"people[{i}] has no '{key}'")
        bbox = person["bbox"]
        numbers = isinstance(bbox, list | tuple) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in bbox
        )
        if not (numbers and len(bbox) == 4):
            raise SampleError("bad_schema", f"people[{i}].bbox must be 4 numbers [x, y, w, h]")
        hands = {}
        for hand in HANDS:
            value = person.get(hand)
            hands[hand] = (
                None
                if value is None
                else _keypoints(value, HAND_KEYPOINTS, f"people[{i}].{hand}", width, height)
            )
        body = _keypoints(person["body"], BODY_KEYPOINTS, f"people[{i}].body", width, height)
        parsed.append(Person(tuple(float(v) for v in bbox), body, **hands))
    return parsed


def _decode_image(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for truncated / non-image bytes
        raise SampleError("bad_image", f"cannot decode '{name}': {exc}") from None
    return image


def key_problem(key: object) -> str | None:
    """Why ``key`` cannot name output files (``None``: it can). Keys become file names
    (``<out>/<key>.png``), so a key must be a plain relative name: not empty, no path
    separators, no ``..``, no control characters, at most :data:`MAX_KEY_LENGTH` characters."""
    if not isinstance(key, str) or not key:
        return "empty or not a string"
    if len(key) > MAX_KEY_LENGTH:
        return f"longer than {MAX_KEY_LENGTH} characters"
    if "/" in key or "\\" in key:
        return "contains a path separator"
    if ".." in key or key.startswith("."):
        return "contains '..' or starts with '.'"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "contains control characters"
    return None


def decode_sample(raw: dict, min_image_size: int = MIN_IMAGE_SIZE) -> Sample:
    """Decode and validate one raw WebDataset sample (a dict of bytes keyed by extension);
    an image whose shorter side is below ``min_image_size`` px is ``too_small``."""
    key = raw.get("__key__", "?")
    url = raw.get("__url__", "?")
    problem = key_problem(key)
    if problem is not None:
        raise SampleError("bad_key", f"key {key!r} {problem}")
    image_key = next((k for k in ("jpg", "jpeg", "png") if k in raw), None)
    if image_key is None:
        raise SampleError("missing_key", "no 'jpg' or 'png' image")
    if "json" not in raw:
        raise SampleError("missing_key", "no 'json' record")
    image = _decode_image(raw[image_key], image_key).convert("RGB")
    if min(image.size) < min_image_size:
        raise SampleError(
            "too_small", f"image is {image.size[0]}x{image.size[1]}, below {min_image_size} px"
        )
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError("bad_json", str(exc)) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "the json record is not an object")
    for field_name in ("width", "height", "people"):
        if field_name not in meta:
            raise SampleError("bad_schema", f"json has no '{field_name}'")
    if (meta["width"], meta["height"]) != image.size:
        raise SampleError(
            "bad_schema",
            f"json says {meta['width']}x{meta['height']}, image is {image.size[0]}x{image.size[1]}",
        )
    caption = meta.get("caption")
    if caption is None and "txt" in raw:
        caption = raw["txt"].decode("utf-8", errors="replace").strip()
    if not isinstance(caption, str):
        raise SampleError("missing_key", "no caption in json or 'txt'")
    people = parse_people(meta["people"], *image.size)
    mask = None
    if "mask.png" in raw:
        # Decoded here rather than by webdataset, whose "pil" decoder turns masks into RGB.
        mask_image = _decode_image(raw["mask.png"], "mask.png")
        if mask_image.size != image.size:
            raise SampleError("bad_mask", f"mask is {mask_image.size}, image is {image.size}")
        mask = (np.asarray(mask_image.convert("L")) >= 128).astype(np.uint8) * 255
    return Sample(key, url, image, caption, meta.get("source", {}), people, mask)
