"""Hand depth (capsules and palm from 21 keypoints) and HandRefiner's normalisation and
inpainting-mask rule, on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pose_estimation.hand_depth import (
    BONES,
    capsule_depth,
    normalise_depth,
    refiner_mask,
    render_hand_depth,
    triangle_depth,
)


def test_bones_chain_every_finger_from_the_wrist():
    assert len(BONES) == 20
    assert BONES[:4] == ((0, 1), (1, 2), (2, 3), (3, 4))  # thumb
    assert BONES[-4:] == ((0, 17), (17, 18), (18, 19), (19, 20))  # little finger


def test_capsule_front_surface_by_hand():
    a, b = np.array([10.0, 10.0, 5.0]), np.array([30.0, 10.0, 5.0])
    xs = np.array([[20.0, 20.0, 20.0, 8.0]])
    ys = np.array([[10.0, 13.0, 15.0, 10.0]])
    depth = capsule_depth(a, b, 4.0, xs, ys)
    # on the axis: z - r; 3 px off it: z - sqrt(16 - 9); 5 px off: outside; the round end
    # 2 px before a: z - sqrt(16 - 4)
    np.testing.assert_allclose(depth[0, :2], [1.0, 5 - math.sqrt(7)])
    assert math.isinf(depth[0, 2])
    assert depth[0, 3] == pytest.approx(5 - math.sqrt(12))
    sloped = capsule_depth(
        a, np.array([30.0, 10.0, 25.0]), 4.0, np.array([[20.0]]), np.array([[10.0]])
    )
    assert sloped[0, 0] == pytest.approx(15.0 - 4.0)  # z halfway along the bone


def test_palm_triangle_interpolates_depth():
    tri = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 10.0], [0.0, 10.0, 0.0]])  # z = x
    depth = triangle_depth(tri, np.array([[5.0, 9.0]]), np.array([[2.5, 9.0]]))
    assert depth[0, 0] == pytest.approx(5.0) and math.isinf(depth[0, 1])


def test_normalisation_as_released():
    depth = np.array([[np.inf, 1.0], [3.0, 5.0]])
    np.testing.assert_allclose(normalise_depth(depth), [[0.0, 1.0], [0.6, 0.2]])
    assert (normalise_depth(np.full((2, 2), np.inf)) == 0).all()
    np.testing.assert_allclose(normalise_depth(np.array([[2.0, np.inf]])), [[1.0, 0.0]])


def test_mask_rule_pads_each_axis_by_30px_or_15_percent():
    depth = np.zeros((200, 300))
    depth[50:70, 100:120] = 0.5  # a 20 x 20 hand: 15 % of 21 is 3 px, so 30 px
    keypoints = np.array([[105.0, 55.0, 0.0], [118.0, 66.0, 0.0]])
    mask = refiner_mask(depth, keypoints)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 99, 70, 149)
    wide = np.zeros((400, 600))
    wide[100:120, 50:350] = 0.5  # 300 px wide: int(0.15 x 301) = 45 px on x, 30 on y
    rows, cols = np.nonzero(refiner_mask(wide, np.array([[60.0, 110.0, 0.0]])))
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (5, 394, 70, 149)
    corner = np.zeros((50, 50))
    corner[0:5, 0:5] = 1.0  # clipped to the image
    rows, cols = np.nonzero(refiner_mask(corner, np.array([[2.0, 2.0, 0.0]])))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 34, 0, 34)


def test_a_rendered_hand_covers_its_bones_with_the_nearest_finger_brightest():
    keypoints = np.zeros((21, 3))
    keypoints[0] = [48, 50, 0]
    for finger, base in enumerate((1, 5, 9, 13, 17)):
        for joint in range(4):
            keypoints[base + joint] = [36 + 6 * finger, 42 - 7 * joint, 0]
    keypoints[5:9, 2] = -6  # the index finger points at the camera
    depth = normalise_depth(render_hand_depth(keypoints, (97, 61)))  # any size, not 512
    assert depth.shape == (61, 97)
    assert depth[int(keypoints[8, 1]), int(keypoints[8, 0])] > 0.9  # index tip: nearest
    assert depth[depth > 0].min() == pytest.approx(0.2) and depth.max() == pytest.approx(1.0)
    on_bones = [depth[int(y), int(x)] > 0 for x, y, _ in keypoints]
    assert all(on_bones)
    assert depth[5, 5] == 0 and depth[60, 96] == 0  # background


def test_landmark_depth_of_a_real_hand_covers_it_and_its_mask_contains_it():
    import json
    from pathlib import Path

    from datamodules.converter import read_rgb
    from pose_estimation.hand_depth import LandmarkHandDepth

    photos = Path(__file__).parent / "data" / "real_photos"
    (labelled,) = json.loads((photos / "labels.json").read_text())["photos"][
        "panoptic_ex2_2_000040_l.jpg"
    ]["hands"]
    image = read_rgb(photos / "panoptic_ex2_2_000040_l.jpg")
    hands = LandmarkHandDepth()(image)
    given = np.asarray(labelled["keypoints"])
    (hand,) = [h for h in hands if np.linalg.norm(h.keypoints[0, :2] - given[0, :2]) < 20]
    assert hand.side == "left" and hand.depth.shape == image.shape[:2]
    inside = [hand.depth[int(y), int(x)] > 0 for x, y, _ in hand.keypoints]
    assert np.mean(inside) > 0.9  # the rendered hand lies on its own landmarks
    assert hand.depth[hand.depth > 0].min() >= 0.2 - 1e-9 and hand.depth.max() == 1.0
    for x, y, _ in given:  # the mask holds every labelled keypoint, with 30 px to spare
        assert hand.mask[int(y), int(x)]
    assert not hand.mask[0, 0]
    assert LandmarkHandDepth()(np.zeros((64, 64, 3), np.uint8)) == []  # no hand: nothing


def mesh_model(path, vertices: np.ndarray, size: int = 32) -> str:
    """An ONNX "mesh model" whose output is ``vertices`` ``[1, V, 3]`` whatever the crop."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["value", "nothing"], ["vertices"]),
    ]
    graph = helper.make_graph(
        nodes, "mesh",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, (1, 3, size, size))],
        [helper.make_tensor_value_info("vertices", TensorProto.FLOAT, vertices.shape)],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
         numpy_helper.from_array(vertices.astype(np.float32), "value")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mesh_depth_crops_as_released_mirrors_left_hands_and_rasterises_the_mesh(tmp_path, side):
    from pose_estimation.mediapipe_hands import Hand
    from pose_estimation.mesh_hand_depth import MeshHandDepth, released_crop

    keypoints = np.zeros((21, 3))
    keypoints[:, 0] = np.linspace(20, 40, 21)
    keypoints[:, 1] = np.linspace(10, 30, 21)
    # integer box 20..40 x 10..30 -> side int(20 * 1.6) // 2 * 2 = 32, centre (30, 20), first
    # pixel centre - (side / 2 - 1) = (15, 5)
    assert released_crop(keypoints, (64, 64)) == (15, 5, 32)
    triangle = np.array([[[2.0, 2.0, 0.0], [14.0, 2.0, 0.0], [2.0, 14.0, 6.0]]])
    np.save(tmp_path / "faces.npy", np.array([[0, 1, 2]]))
    finder = lambda image: [Hand(keypoints, 0.9, side, np.zeros(21))]  # noqa: E731
    estimator = MeshHandDepth(
        mesh_model(tmp_path / "mesh.onnx", triangle), str(tmp_path / "faces.npy"),
        min_padding=2, finder=finder,
    )  # fmt: skip
    crops = []
    run = estimator.vertices
    estimator.vertices = lambda crop: (crops.append(crop), run(crop))[1]
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :30] = 200  # bright left half: a mirrored crop has it on the right
    (hand,) = estimator(image)
    # right: vertices at crop (2, 2), (14, 2), (2, 14) -> image (17, 7), (29, 7), (17, 19);
    # left: mirrored in the crop (x -> 32 - x) -> image (45, 7), (33, 7), (45, 19)
    near_col, far_col = (18, 26) if side == "right" else (43, 35)
    # z rises from 0 on the first row of pixel centres (y = 7.5) to 6 at y = 19: nearest 1.0
    assert hand.depth[7, near_col] == pytest.approx(1.0)
    assert hand.depth[7, far_col] == pytest.approx(1.0)
    assert hand.depth[16, near_col] < 0.4  # towards the z = 6 vertex: farther
    assert hand.depth[8, 61 - near_col] == 0  # the other side of the crop stays empty
    bright_left = crops[0][:, :10].mean() > crops[0][:, -10:].mean()
    assert bright_left == (side == "right")
    assert hand.mask[7, near_col] and hand.mask[30, 40] and not hand.mask[50, 5]


def test_mesh_depth_refuses_missing_files_and_pickled_faces(tmp_path):
    from pose_estimation.mesh_hand_depth import MeshHandDepth

    with pytest.raises(FileNotFoundError, match=r"model='nowhere\.onnx'"):
        MeshHandDepth("nowhere.onnx", "faces.npy", finder=lambda image: [])
    model = mesh_model(tmp_path / "m.onnx", np.zeros((1, 3, 3)))
    np.save(tmp_path / "faces.npy", np.array([{"faces": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        MeshHandDepth(model, str(tmp_path / "faces.npy"), finder=lambda image: [])
