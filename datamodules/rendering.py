"""Skeleton and mask rasterisation shared by every datamodule.

Coordinates follow the corner convention: pixel ``i`` covers ``[i, i + 1)``, so a crop at
integer offset ``x0`` maps ``x -> x - x0`` and a resize by ``s`` maps ``x -> x * s``.
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

# 21-point hand (MediaPipe / InterHand2.6M after reordering / HaGRID v2): 0 wrist, then
# thumb, index, middle, ring, pinky, each from base to tip.
HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4),
    (0, 5), (5, 6), (6, 7), (7, 8),
    (0, 9), (9, 10), (10, 11), (11, 12),
    (0, 13), (13, 14), (14, 15), (15, 16),
    (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip

# OpenPose's hand palette: edge i has hue i / 20 at full saturation and value; joints blue.
HAND_EDGE_COLORS = tuple(
    tuple(round(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
    for i in range(len(HAND_EDGES))
)
HAND_JOINT_COLOR = (0, 0, 255)
# Left hands in the per-side palette (``side="left"``): the same hues at half saturation and
# white joints. A 2-D skeleton cannot tell a palm-facing right hand from a back-facing left
# one; the palette tells the hand generator which side to draw.
LEFT_HAND_EDGE_COLORS = tuple(
    tuple(round(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 0.5, 1.0))
    for i in range(len(HAND_EDGES))
)
LEFT_HAND_JOINT_COLOR = (255, 255, 255)

# OpenPose's 18-keypoint body layout, the one ControlNet's OpenPose models were trained on:
# nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle,
# left hip/knee/ankle, right eye, left eye, right ear, left ear. COCO-17 has no neck: it is
# the midpoint of the shoulders, labelled when both are.
COCO_TO_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip

# COCO-17's own skeleton (pycocotools' category "skeleton", 0-based), drawn by HumanSD-style
# body-only renderings.
COCO_LIMBS = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip

# HumanSD's pose images (its released ``ldm/data/humansd.py``): 16 COCO-17 limbs (no
# shoulder-shoulder or hip-hip), limb i in colour i of seaborn's ``color_palette("hls", 16)``
# (hues i/16 + 0.01, lightness 0.6, saturation 0.65; channels int(255 * c)), 10 px lines and
# radius-5 discs at both ends of every drawn limb, in limb order.
HUMANSD_LIMBS = (
    (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 8), (7, 9), (8, 10), (5, 11),
    (6, 12), (11, 13), (12, 14), (13, 15), (14, 16),
)  # fmt: skip
HUMANSD_COLORS = tuple(
    tuple(int(255 * c) for c in colorsys.hls_to_rgb((i / len(HUMANSD_LIMBS) + 0.01) % 1, 0.6, 0.65))
    for i in range(len(HUMANSD_LIMBS))
)
HUMANSD_KEYPOINT_THRESHOLD = 0.02

# cv2 draws on an integer grid; 4 fractional bits keep sub-pixel keypoint positions.
_SHIFT = 4


def _fixed(x: float, y: float) -> tuple[int, int]:
    # Corner convention -> cv2's centre convention: pixel i's centre is at i + 0.5.
    scale = 1 << _SHIFT
    return round((x - 0.5) * scale), round((y - 0.5) * scale)


def draw_hand_skeleton(
    canvas: np.ndarray,
    keypoints: np.ndarray,
    line_width: int = 2,
    joint_radius: int = 2,
    side: str | None = None,
) -> np.ndarray:
    """Draw a 21-point hand in OpenPose colours onto ``canvas`` ``[H, W, 3]`` uint8 RGB, in place.

    Only edges whose two ends are labelled (``v > 0``) are drawn, and only labelled joints.
    ``side="left"`` draws in the left-hand palette; ``None`` or ``"right"`` in OpenPose's.
    """
    if side not in (None, "left", "right"):
        raise ValueError(f"side={side!r}: choose 'left', 'right' or None")
    edge_colors, joint_color = (
        (LEFT_HAND_EDGE_COLORS, LEFT_HAND_JOINT_COLOR)
        if side == "left"
        else (HAND_EDGE_COLORS, HAND_JOINT_COLOR)
    )
    labelled = keypoints[:, 2] > 0
    for (a, b), color in zip(HAND_EDGES, edge_colors, strict=True):
        if labelled[a] and labelled[b]:
            cv2.line(
                canvas,
                _fixed(*keypoints[a, :2]),
                _fixed(*keypoints[b, :2]),
                color,
                thickness=line_width,
                lineType=cv2.LINE_AA,
                shift=_SHIFT,
            )
    if joint_radius > 0:
        for x, y, _ in keypoints[labelled]:
            cv2.circle(
                canvas,
                _fixed(x, y),
                joint_radius << _SHIFT,
                joint_color,
                thickness=-1,
                lineType=cv2.LINE_AA,
                shift=_SHIFT,
            )
    return canvas


def render_hand_skeleton(
    keypoints: np.ndarray,
    size: int,
    line_width: int = 2,
    joint_radius: int = 2,
    side: str | None = None,
) -> np.ndarray:
    """Hand skeleton on a black square canvas: ``[size, size, 3]`` uint8."""
    canvas = np.zeros((size, size, 3), np.uint8)
    return draw_hand_skeleton(canvas, keypoints, line_width, joint_radius, side)


def hull_mask(keypoints: np.ndarray, size: tuple[int, int], dilation: int = 0) -> np.ndarray:
    """Convex hull of the labelled keypoints, dilated by ``dilation`` px: ``[H, W]`` uint8 0/255.

    ``size`` is ``(width, height)``. A stand-in for a real segmentation when a dataset has
    none: it misses finger gaps and the skin beyond the joints, hence the dilation.
    """
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    points = keypoints[keypoints[:, 2] > 0, :2]
    if len(points) == 0:
        return mask
    fixed = np.array([_fixed(x, y) for x, y in points], np.int32)
    hull = cv2.convexHull(fixed)
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_8, shift=_SHIFT)
    if dilation > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1,) * 2)
        mask = cv2.dilate(mask, kernel)
    return mask


def coco_to_openpose(body: np.ndarray) -> np.ndarray:
    """COCO-17 ``[17, 3]`` -> OpenPose-18 ``[18, 3]`` (neck added between the shoulders)."""
    out = np.zeros((18, 3))
    for k, c in enumerate(COCO_TO_OPENPOSE):
        if c is not None:
            out[k] = body[c]
    shoulders = body[[5, 6]]
    if (shoulders[:, 2] > 0).all():
        out[1] = [*shoulders[:, :2].mean(0), shoulders[:, 2].min()]
    return out


def draw_body_skeleton(
    canvas: np.ndarray,
    body: np.ndarray,
    line_width: int = 4,
    joint_radius: int = 4,
    layout: str = "openpose18",
) -> np.ndarray:
    """Draw a COCO-17 body onto ``canvas`` ``[H, W, 3]`` uint8 RGB, in place.

    ``layout="openpose18"``: as an OpenPose-18 skeleton (neck added; limbs at 60 % intensity,
    as ControlNet's OpenPose renderer). ``layout="coco17"``: COCO's own 19 limbs, no neck, in
    the same palette. ``layout="humansd16"``: exactly HumanSD's released renderer
    (:func:`draw_humansd_skeleton`; ``joint_radius`` is unused, the discs are
    ``line_width // 2``), so that its released checkpoint sees its own pose images.
    """
    if layout == "humansd16":
        return draw_humansd_skeleton(canvas, body, line_width)
    if layout == "openpose18":
        points, limbs = coco_to_openpose(body), OPENPOSE_LIMBS
    elif layout == "coco17":
        points, limbs = body, COCO_LIMBS
    else:
        raise ValueError(f"layout={layout!r}: choose 'openpose18', 'coco17' or 'humansd16'")
    labelled = points[:, 2] > 0
    for n, (a, b) in enumerate(limbs):
        if labelled[a] and labelled[b]:
            color = OPENPOSE_COLORS[n % len(OPENPOSE_COLORS)]
            cv2.line(
                canvas,
                _fixed(*points[a, :2]),
                _fixed(*points[b, :2]),
                tuple(int(c * 0.6) for c in color),
                thickness=line_width,
                lineType=cv2.LINE_AA,
                shift=_SHIFT,
            )
    for k in np.flatnonzero(labelled):
        cv2.circle(
            canvas,
            _fixed(*points[k, :2]),
            joint_radius << _SHIFT,
            OPENPOSE_COLORS[k],
            thickness=-1,
            lineType=cv2.LINE_AA,
            shift=_SHIFT,
        )
    return canvas


def draw_humansd_skeleton(canvas: np.ndarray, body: np.ndarray, width: int = 10) -> np.ndarray:
    """HumanSD's ``plot_kpts``: for each of :data:`HUMANSD_LIMBS` whose two keypoints score
    above 0.02, a ``width`` px line (cv2's default 8-connected, coordinates truncated to
    integers as ``int()`` does) and ``width // 2`` discs at both ends, in the limb's colour."""
    kept = body[:, 2] > HUMANSD_KEYPOINT_THRESHOLD
    for (a, b), color in zip(HUMANSD_LIMBS, HUMANSD_COLORS, strict=True):
        if kept[a] and kept[b]:
            pa, pb = (int(body[a, 0]), int(body[a, 1])), (int(body[b, 0]), int(body[b, 1]))
            cv2.line(canvas, pa, pb, color, width)
            cv2.circle(canvas, pa, width // 2, color, -1)
            cv2.circle(canvas, pb, width // 2, color, -1)
    return canvas


def render_full_skeleton(
    people,
    size: tuple[int, int],
    body_width: int = 4,
    hand_width: int = 2,
    layout: str = "openpose18",
    hands: bool = True,
) -> np.ndarray:
    """Bodies (and, with ``hands``, hands) of every person on black: ``[H, W, 3]`` uint8;
    ``size`` = (W, H). Each ``people`` entry has ``body`` ``[17, 3]`` and
    ``left_hand``/``right_hand`` ``[21, 3]`` or None (``datamodules.schema.Person``)."""
    width, height = size
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        draw_body_skeleton(canvas, person.body, body_width, body_width, layout)
        for hand in (person.left_hand, person.right_hand) if hands else ():
            if hand is not None:
                draw_hand_skeleton(canvas, hand, hand_width, max(1, hand_width // 2))
    return canvas
