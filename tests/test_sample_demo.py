"""Sampling from one pose without shards (`make sample`) and the local web demo's API."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.config import ConfigError
from experiments.sample import Sampler, main, read_pose

ROOT = Path(__file__).resolve().parents[1]
POSE = ROOT / "docs/examples/pose.json"
CONFIG = str(ROOT / "experiments/eval/tiny.yaml")


def test_openpose_body25_and_hands_map_to_the_schema(tmp_path):
    body = np.zeros((25, 3))
    body[0] = [100, 50, 0.9]  # nose
    body[2], body[5] = [80, 90, 0.8], [120, 90, 0.7]  # right, left shoulder
    body[4], body[7] = [60, 150, 0.6], [140, 150, 0.0]  # right wrist; left wrist not found
    body[16] = [105, 45, 0.5]  # left eye
    left = np.zeros((21, 3))
    left[0], left[8] = [142, 152, 0.9], [150, 180, 0.8]  # wrist, index tip
    record = {"canvas_width": 200, "canvas_height": 300, "people": [{
        "pose_keypoints_2d": body.reshape(-1).tolist(),
        "hand_left_keypoints_2d": left.reshape(-1).tolist(),
        "hand_right_keypoints_2d": np.zeros(63).tolist(),
    }]}  # fmt: skip
    path = tmp_path / "openpose.json"
    path.write_text(json.dumps(record))
    pose = read_pose(str(path))
    assert pose.size == (200, 300)
    (person,) = pose.people
    np.testing.assert_allclose(person.body[0], [100, 50, 0.9])
    np.testing.assert_allclose(person.body[1], [105, 45, 0.5])  # COCO 1 = left eye
    np.testing.assert_allclose(person.body[5], [120, 90, 0.7])  # COCO 5 = left shoulder
    np.testing.assert_allclose(person.body[6], [80, 90, 0.8])
    np.testing.assert_allclose(person.body[10], [60, 150, 0.6])  # right wrist
    assert person.body[9, 2] == 0  # not found: unlabelled
    np.testing.assert_allclose(person.left_hand[8], [150, 180, 0.8])
    assert person.right_hand is None  # all zero: no hand


def test_bad_pose_files_get_one_line_naming_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken\.json"):
        read_pose(str(broken))
    openpose = tmp_path / "nosize.json"
    openpose.write_text(json.dumps({"people": [{"pose_keypoints_2d": [0.0] * 75}]}))
    with pytest.raises(ConfigError, match="--size"):
        read_pose(str(openpose))
    off = tmp_path / "off.json"
    record = json.loads(POSE.read_text())
    record["width"] = 10  # every keypoint now lies outside the image
    off.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"off\.json.*outside"):
        read_pose(str(off))


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    return Sampler(CONFIG, str(tmp_path_factory.mktemp("samples")))


def test_a_pose_gives_an_image_and_its_skeleton_deterministically(sampler):
    pose = read_pose(str(POSE))
    (first,) = sampler("plain_sd", pose, "a person waving", seed=3, key="waving")
    image = np.asarray(Image.open(first.image))
    size = sampler.predictor("plain_sd", 3).resolution  # the method's own (64 px, tiny)
    assert image.shape == (size, size, 3)
    pair = np.asarray(Image.open(first.pair))
    assert pair.shape == (size, 2 * size, 3)
    np.testing.assert_array_equal(pair[:, size:], image)  # the image beside its skeleton
    assert np.asarray(Image.open(first.skeleton)).any()  # the skeleton is drawn
    (again,) = sampler("plain_sd", pose, "a person waving", seed=3, key="waving")
    np.testing.assert_array_equal(np.asarray(Image.open(again.image)), image)
    (other,) = sampler("plain_sd", pose, "a person waving", seed=4, key="waving")
    assert not np.array_equal(np.asarray(Image.open(other.image)), image)


def test_a_skeleton_image_is_taken_as_is_or_refused_where_keypoints_are_needed(sampler):
    from experiments.sample import read_skeleton

    skeleton = read_skeleton(str(POSE.with_name("skeleton.png")))
    (made,) = sampler("plain_sd", skeleton, "a person", key="from_skeleton")
    size = sampler.predictor("plain_sd", 0).resolution
    given = np.asarray(Image.open(POSE.with_name("skeleton.png")).resize((size, size)))
    shown = np.asarray(Image.open(made.skeleton))
    assert np.abs(shown.astype(int) - given.astype(int)).mean() < 8  # the given skeleton
    with pytest.raises(ConfigError, match="needs keypoints"):
        sampler("two_stage", skeleton, "a person", key="from_skeleton")


def test_the_command_prints_what_it_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    written = main(["--pose", str(POSE), "--prompt", "a person", "--methods", "plain_sd",
                    "--config", CONFIG, "--out", str(tmp_path)])  # fmt: skip
    folder = tmp_path / "plain_sd"
    assert written == [folder / f"pose{s}.png" for s in ("", "_skeleton", "_with_skeleton")]
    out = capsys.readouterr().out
    assert all(f"written: {path}" in out for path in written)
    with pytest.raises(SystemExit):
        main(["--pose", str(POSE), "--prompt", "x", "--methods", "nope", "--config", CONFIG])
    assert "method 'nope'" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_serves_this_machine_only_by_default(monkeypatch):
    import experiments.demo as demo

    launched = {}

    class Page:
        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(demo, "build_demo", lambda sampler, methods: Page())
    demo.main(["--config", CONFIG, "--methods", "plain_sd"])
    assert launched["server_name"] == "127.0.0.1"


def test_demo_generates_through_its_api_on_localhost(sampler):
    from gradio_client import Client, handle_file

    from experiments.demo import build_demo

    demo = build_demo(sampler, ["plain_sd"])
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery = client.predict(
            handle_file(str(POSE)), None, "photo", "a person waving", ["plain_sd"], 0,
            api_name="/generate",
        )  # fmt: skip
    finally:
        demo.close()
    assert [item["caption"] for item in gallery] == ["skeleton", "plain_sd"]
    size = sampler.predictor("plain_sd", 0).resolution
    assert np.asarray(Image.open(gallery[1]["image"])).shape[:2] == (size, size)
