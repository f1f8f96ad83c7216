"""Hand depth from a hand-mesh model (Mesh Graphormer, HaMeR, WiLoR) exported to ONNX: the
high-fidelity :class:`~pose_estimation.hand_depth.HandDepthEstimator` of HandRefiner.

The crop follows HandRefiner's released ``preprocessor/meshgraphormer.py``: around each hand
MediaPipe finds, a square of side ``(max(w, h) * 1.6) // 2 * 2`` px centred on the integer
landmark box (:func:`released_crop`), on the image zero-padded (pixels outside it are black);
left hands mirrored, since the mesh models reconstruct right hands (MANO's right hand); resized
to the model's input size (bicubic when enlarging, area when shrinking) and normalised with
ImageNet's mean and standard deviation. Its mesh is rasterised with a z-buffer (the nearest
face per pixel), mirrored back, mapped to the image and normalised as the release does
(:func:`~pose_estimation.hand_depth.normalise_depth`); the mask is
:func:`~pose_estimation.hand_depth.refiner_mask` over the depth and the landmarks.

The ONNX contract (what an export script for a given model must produce): one input
``[1, 3, S, S]`` float32 RGB, one output ``[1, V, 3]``: the vertices of a right hand in the
input crop's pixels (x right, y down, in [0, S)) and relative depth z in the same units,
smaller nearer (for a weak-perspective model: ``S/2 * (s * v_xy + t)`` and ``S/2 * s * v_z``).
``faces``: a ``.npy`` int array ``[F, 3]`` of vertex indices (MANO's 1538 faces; MANO's licence
forbids shipping them, so users export them from their own MANO file). Both files are data: no
pickle is read (``allow_pickle=False``) and ONNX graphs run no Python.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pose_estimation.hand_depth import (
    HandDepth,
    normalise_depth,
    refiner_mask,
    triangle_depth,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def released_crop(keypoints: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int]:
    """``(x0, y0, side)`` of the square crop around a hand's landmarks ``[21, >=2]`` (px) in a
    ``size`` (width, height) image, as the release computes it on the image zero-padded by
    half its size: integer landmark box, centre ``(min + max) // 2``, side ``(max(w, h) * 1.6)
    // 2 * 2``, first pixel ``centre - side / 2 + 1`` (may lie outside the image)."""
    width, height = size
    x_min, y_min = (int(v) for v in keypoints[:, :2].min(0))
    x_max, y_max = (int(v) for v in keypoints[:, :2].max(0))
    side = int(max(x_max - x_min, y_max - y_min) * 1.6) // 2 * 2
    x_c, y_c = (x_min + x_max) // 2, (y_min + y_max) // 2
    x0 = int(x_c - (side / 2 - 1) + width / 2) - int(width / 2)
    y0 = int(y_c - (side / 2 - 1) + height / 2) - int(height / 2)
    return x0, y0, max(side, 2)


def cut_square(image: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """The ``side`` x ``side`` square at ``(x0, y0)``, black where it leaves the image."""
    height, width = image.shape[:2]
    out = np.zeros((side, side, image.shape[2]), image.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, width), min(y0 + side, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def rasterise_mesh(vertices: np.ndarray, faces: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Z-buffer depth ``[H, W]`` (inf where no face) of a mesh whose vertices ``[V, 3]`` are in
    pixels (x, y) and relative depth (z, smaller nearer) in a ``size`` (width, height) image."""
    width, height = size
    depth = np.full((height, width), np.inf)
    for face in faces:
        tri = vertices[face]
        lo = np.floor(np.maximum(tri[:, :2].min(0), 0)).astype(int)
        hi = np.ceil(np.minimum(tri[:, :2].max(0) + 1, [width, height])).astype(int)
        if (hi <= lo).any():
            continue
        ys, xs = np.mgrid[lo[1] : hi[1], lo[0] : hi[0]] + 0.5
        region = depth[lo[1] : hi[1], lo[0] : hi[0]]
        np.minimum(region, triangle_depth(tri, xs, ys), out=region)
    return depth


class MeshHandDepth:
    """A hand-mesh model (ONNX, see the module docstring) on each hand a finder reports.

    ``finder``: ``finder(image) -> list`` of hands with ``keypoints`` ``[21, >=2]`` px and
    ``side`` (default: MediaPipe Hands with HandRefiner's settings, 2 hands, confidence 0.6).
    """

    def __init__(
        self,
        model: str,
        faces: str,
        input_size: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        min_padding: int = 30,
        finder=None,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ):
        import onnxruntime

        for key, path in (("model", model), ("faces", faces)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"MeshHandDepth {key}={path!r}: no such file")
        self.faces = np.load(faces, allow_pickle=False)
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(
                f"MeshHandDepth faces={faces!r}: expected [F, 3], got {self.faces.shape}"
            )
        self.session = onnxruntime.InferenceSession(model, providers=list(providers))
        shape = self.session.get_inputs()[0].shape
        self.input_size = input_size or int(shape[-1])
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.min_padding = min_padding
        if finder is None:
            from pose_estimation.mediapipe_hands import MediaPipeHandFinder

            finder = MediaPipeHandFinder(2, 0.6, min_presence_confidence=0.6)
        self.finder = finder

    def vertices(self, crop: np.ndarray) -> np.ndarray:
        """The model's right-hand vertices ``[V, 3]`` (crop px) for an RGB crop ``[S, S, 3]``."""
        x = (crop.astype(np.float32) / 255 - self.mean) / self.std
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        out = self.session.run(None, {self.session.get_inputs()[0].name: x})[0]
        vertices = np.asarray(out, np.float64).reshape(-1, 3)
        if self.faces.max() >= len(vertices):
            raise ValueError(
                f"MeshHandDepth: faces index vertex {self.faces.max()} but the model returned "
                f"{len(vertices)} vertices"
            )
        return vertices

    def __call__(self, image: np.ndarray) -> list[HandDepth]:
        height, width = image.shape[:2]
        s = self.input_size
        out = []
        for hand in self.finder(image):
            x0, y0, side = released_crop(hand.keypoints, (width, height))
            crop = cut_square(image, x0, y0, side)
            left = hand.side == "left"
            if left:
                crop = crop[:, ::-1]
            # the release's interpolation: bicubic when enlarging, area when shrinking
            interpolation = cv2.INTER_CUBIC if side < s else cv2.INTER_AREA
            crop = cv2.resize(np.ascontiguousarray(crop), (s, s), interpolation=interpolation)
            v = self.vertices(crop)
            if left:
                v[:, 0] = s - v[:, 0]
            v = v * (side / s) + (x0, y0, 0.0)
            depth = normalise_depth(rasterise_mesh(v, self.faces, (width, height)))
            keypoints = np.asarray(hand.keypoints, np.float64)[:, :2]
            mask = refiner_mask(depth, keypoints, self.min_padding)
            # MediaPipe's relative z orders overlapping hands (combine_hands)
            z = getattr(hand, "depth", None)
            z = np.zeros(len(keypoints)) if z is None else np.asarray(z, np.float64)
            xyz = np.concatenate([keypoints, z[:, None]], 1)
            out.append(HandDepth(xyz, hand.side, hand.score, depth, mask))
        return out
