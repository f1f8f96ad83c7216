"""The rtmlib backend on small random ONNX models with the inputs and outputs of YOLOX,
RTMPose/RTMW and RTMO: decoding, coordinate conventions and the 133-keypoint hand layout,
checked against coordinates computed by hand from rtmlib's documented transforms."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pose_estimation import RTMLibPeople


def save_model(graph, path) -> str:
    """``graph`` as a checked opset-17 ONNX file at ``path`` (onnxruntime 1.32 reads IR 8)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def constant_model(path, input_shape: tuple[int, ...], outputs: dict[str, np.ndarray]) -> str:
    """An ONNX model whose outputs are the given arrays whatever the image (each output is
    ``value + 0 * mean(input)``, so the graph reads its input as a real model does)."""
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0)]
    nodes.append(helper.make_node("Mul", ["mean", "zero"], ["nothing"]))
    initializers = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outputs = []
    for name, value in outputs.items():
        initializers.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_value"))
        nodes.append(helper.make_node("Add", [f"{name}_value", "nothing"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape))
    graph = helper.make_graph(
        nodes, "constant", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        graph_outputs, initializers,
    )  # fmt: skip
    return save_model(graph, path)


def blue_detector(path, box: np.ndarray) -> str:
    """A YOLOX-shaped ONNX detector (``dets [1, 1, 5]``, ``labels [1, 1]``) that reports
    ``box`` with a score of the mean of input channel 0 / 255: high for a blue image fed as
    BGR, low for a red one (and for blue fed as RGB)."""
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("Slice", ["means", "start", "end", "axis"], ["first"]),
        helper.make_node("Div", ["first", "scale"], ["score"]),
        helper.make_node("Reshape", ["score", "shape"], ["score3"]),
        helper.make_node("Concat", ["box", "score3"], ["dets"], axis=2),
        helper.make_node("Mul", ["score", "zero"], ["labels"]),
    ]
    constants = {"start": np.array([0]), "end": np.array([1]), "axis": np.array([1]),
                 "shape": np.array([1, 1, 1])}  # fmt: skip
    initializers = [numpy_helper.from_array(v.astype(np.int64), k) for k, v in constants.items()]
    initializers += [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(box.astype(np.float32).reshape(1, 1, 4), "box"),
    ]
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, (1, 3, 640, 640))
    graph = helper.make_graph(
        nodes, "blue", [image],
        [helper.make_tensor_value_info("dets", TensorProto.FLOAT, (1, 1, 5)),
         helper.make_tensor_value_info("labels", TensorProto.FLOAT, (1, 1))],
        initializers,
    )  # fmt: skip
    return save_model(graph, path)


def simcc(rng, bins: np.ndarray, width: int) -> np.ndarray:
    """``[1, K, width]`` random responses below 0.5 with a 0.9 peak at each keypoint's bin."""
    out = rng.uniform(0, 0.5, (1, len(bins), width))
    out[0, np.arange(len(bins)), bins] = 0.9
    return out


@pytest.fixture
def image():
    return np.zeros((300, 480, 3), np.uint8)  # H x W; YOLOX's ratio = min(640/300, 640/480)


def test_top_down_wholebody_keypoints_land_where_rtmlibs_transforms_put_them(tmp_path, image):
    rng = np.random.default_rng(0)
    ratio = 640 / 480
    box = np.array([60.0, 30.0, 180.0, 270.0])  # in the image, x0 y0 x1 y1
    det = constant_model(
        tmp_path / "yolox.onnx", (1, 3, 640, 640),
        {"dets": np.r_[box * ratio, 0.95][None, None], "labels": np.zeros((1, 1))},
    )  # fmt: skip
    bins_x, bins_y = rng.integers(0, 384, 133), rng.integers(0, 512, 133)
    bins_x[91], bins_y[91] = 100, 200  # the left hand's wrist
    pose = constant_model(
        tmp_path / "rtmw.onnx", (1, 3, 256, 192),
        {"simcc_x": simcc(rng, bins_x, 384), "simcc_y": simcc(rng, bins_y, 512)},
    )  # fmt: skip
    estimator = RTMLibPeople(pose, det, pose_input_size=(192, 256), min_hand_score=0.5)
    (person,) = estimator.people(image)
    # rtmlib: the box padded x1.25 about its centre, widened to the input's 3:4 aspect, then
    # x = bin / 2 / 192 * scale_w + cx - scale_w / 2 (simcc split ratio 2)
    centre = np.array([120.0, 150.0])
    scale_h = 240 * 1.25
    scale = np.array([scale_h * 192 / 256, scale_h])  # 150 x 1.25 = 187.5 < 225: widened
    expected = np.stack([bins_x, bins_y], -1) / 2 / np.array([192, 256]) * scale
    expected += centre - scale / 2
    np.testing.assert_allclose(person["body"][:, :2], expected[:17], atol=1e-3)
    np.testing.assert_allclose(person["left_hand"][:, :2], expected[91:112], atol=1e-3)
    np.testing.assert_allclose(person["right_hand"][:, :2], expected[112:133], atol=1e-3)
    np.testing.assert_allclose(person["left_hand"][0, :2], [100 / 2 / 192 * 225 + 7.5,
                                                           200 / 2 / 256 * 300 + 0.0])  # fmt: skip
    np.testing.assert_allclose(person["body"][:, 2], 0.9)  # the mean of the two axes' peaks
    assert person["score"] == pytest.approx(0.9)


def test_hands_below_the_score_threshold_are_left_out(tmp_path, image):
    rng = np.random.default_rng(1)
    det = constant_model(
        tmp_path / "yolox.onnx", (1, 3, 640, 640),
        {"dets": np.array([[[40.0, 40.0, 200.0, 300.0, 0.9]]]), "labels": np.zeros((1, 1))},
    )  # fmt: skip
    x, y = simcc(rng, rng.integers(0, 384, 133), 384), simcc(rng, rng.integers(0, 512, 133), 512)
    x[0, 112:133] *= 0.2  # the right hand's keypoints score (0.18 + 0.18) / 2 = 0.18
    y[0, 112:133] *= 0.2
    pose = constant_model(tmp_path / "rtmw.onnx", (1, 3, 256, 192), {"simcc_x": x, "simcc_y": y})
    (person,) = RTMLibPeople(pose, det, pose_input_size=(192, 256), min_hand_score=0.5).people(
        image
    )
    assert person["left_hand"] is not None and person["right_hand"] is None
    (hands,) = RTMLibPeople(
        pose, det, pose_input_size=(192, 256), min_hand_score=0.5, part="hands"
    ).estimate(torch.zeros(1, 3, 300, 480))
    assert hands["sides"] == ["left"] and hands["keypoints"].shape == (1, 21, 3)


def test_no_detection_means_no_person_not_the_whole_image(tmp_path, image):
    rng = np.random.default_rng(2)
    det = constant_model(
        tmp_path / "yolox.onnx", (1, 3, 640, 640),
        {"dets": np.array([[[40.0, 40.0, 200.0, 300.0, 0.1]]]), "labels": np.zeros((1, 1))},
    )  # fmt: skip
    pose = constant_model(
        tmp_path / "rtmpose.onnx", (1, 3, 256, 192),
        {"simcc_x": simcc(rng, np.arange(17), 384), "simcc_y": simcc(rng, np.arange(17), 512)},
    )  # fmt: skip
    assert RTMLibPeople(pose, det, pose_input_size=(192, 256)).people(image) == []


def test_images_reach_the_models_as_bgr(tmp_path):
    # rtmlib's models take cv2's BGR frames; handdiff's images are RGB
    rng = np.random.default_rng(4)
    det = blue_detector(tmp_path / "yolox.onnx", np.array([40.0, 40.0, 200.0, 300.0]))
    pose = constant_model(
        tmp_path / "rtmpose.onnx", (1, 3, 256, 192),
        {"simcc_x": simcc(rng, np.arange(17), 384), "simcc_y": simcc(rng, np.arange(17), 512)},
    )  # fmt: skip
    estimator = RTMLibPeople(pose, det, pose_input_size=(192, 256))
    blue, red = np.zeros((300, 480, 3), np.uint8), np.zeros((300, 480, 3), np.uint8)
    blue[..., 2], red[..., 0] = 255, 255  # RGB
    # channel 0 seen by the detector: blue as BGR -> (255 x 400 + 114 x 240) / 640 = 0.79 of
    # 255 (the letterbox pads with 114), above YOLOX's 0.3; red -> 114 x 240 / 640 = 0.17
    assert len(estimator.people(blue)) == 1
    assert estimator.people(red) == []


def test_one_stage_rtmo_keypoints_are_unletterboxed(tmp_path, image):
    rng = np.random.default_rng(3)
    # a wide input, (height, width) = (320, 640) in rtmlib's RTMO order: the 300 x 480 image is
    # scaled by min(320 / 300, 640 / 480) = 16 / 15 (swapping the order would give 2 / 3)
    ratio = 16 / 15
    keypoints = np.concatenate(
        [rng.uniform(0, 300, (3, 17, 2)), np.full((3, 17, 1), 0.8)], -1
    )  # in the input's pixels
    dets = np.array([[10, 10, 200, 300, 0.9], [300, 20, 420, 310, 0.85], [0, 0, 50, 50, 0.2]])
    rtmo = constant_model(
        tmp_path / "rtmo.onnx", (1, 3, 320, 640),
        {"dets": dets[None], "keypoints": keypoints[None]},
    )  # fmt: skip
    people = RTMLibPeople(rtmo, model="rtmo", pose_input_size=(320, 640)).people(image)
    assert len(people) == 2  # the 0.2 detection is under RTMO's score threshold
    by_score = sorted(people, key=lambda p: p["body"][0, 0])
    expected = sorted(keypoints[:2], key=lambda k: k[0, 0])
    for person, kp in zip(by_score, expected, strict=True):
        np.testing.assert_allclose(person["body"][:, :2], kp[:, :2] / ratio, atol=1e-3)
    assert all(p["left_hand"] is None for p in people)  # 17 keypoints: no hands


def test_missing_model_files_are_refused_before_rtmlib_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pose='nowhere/rtmw\.onnx'"):
        RTMLibPeople("nowhere/rtmw.onnx", str(tmp_path / "yolox.onnx"))
    pose = constant_model(tmp_path / "p.onnx", (1, 3, 8, 8), {"simcc_x": np.zeros((1, 17, 16))})
    with pytest.raises(FileNotFoundError, match="det="):
        RTMLibPeople(pose, str(tmp_path / "yolox.onnx"))
    with pytest.raises(ValueError, match="needs det="):
        RTMLibPeople(pose)
