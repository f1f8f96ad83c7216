"""The conversion engine (splits, shards, resume, summary) and the MediaPipe auto-annotator."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from datamodules.annotate import main as annotate_main
from datamodules.converter import Drop, _tar_bytes, convert_dataset, parse_size, split_of
from datamodules.full_body_datamodule import FullBodyDataModule
from datamodules.hand_datamodule import HandDataModule
from datamodules.schema import decode_sample
from tests.conftest import make_raw_sample


def _read(out):
    import webdataset as wds

    return {
        s.key: s
        for s in map(
            decode_sample,
            wds.DataPipeline(
                wds.SimpleShardList(sorted(str(p) for p in out.glob("*.tar"))),
                wds.tarfile_to_samples(),
            ),
        )
    }


def _item_sample(item: int) -> dict | Drop:
    if item % 7 == 3:
        return Drop("odd_item")
    raw = make_raw_sample(key=f"item{item:04d}")
    return {k: v for k, v in raw.items() if k != "__url__"}


def _digests(folder) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))
    }


def test_split_is_stable_and_about_the_fraction():
    ids = [f"img{i}" for i in range(4000)]
    val = [i for i in ids if split_of(i, 0.1) == "val"]
    assert 300 < len(val) < 500
    # growing the dataset never moves an old sample
    assert [i for i in ids[:2000] if split_of(i, 0.1) == "val"] == val[
        : len([i for i in ids[:2000] if split_of(i, 0.1) == "val"])
    ]


def test_engine_writes_resumable_identical_shards(tmp_path):
    items = list(range(50))
    out = tmp_path / "shards"
    summary = convert_dataset(items, str, _item_sample, out, samples_per_shard=8, val_fraction=0.2)
    n_drop = sum(1 for i in items if i % 7 == 3)
    assert summary["train"]["written"] + summary["val"]["written"] == 50 - n_drop
    dropped = summary["train"]["dropped"].get("odd_item", 0) + summary["val"]["dropped"].get(
        "odd_item", 0
    )
    assert dropped == n_drop
    assert json.loads((out / "summary.json").read_text()) == summary
    first = _digests(out)
    # "kill" the run: a missing shard and a half-written temporary file
    victim = sorted(out.glob("train-*.tar"))[1]
    victim.unlink()
    (out / (victim.name + ".tmp")).write_bytes(b"partial")
    again = convert_dataset(items, str, _item_sample, out, samples_per_shard=8, val_fraction=0.2)
    assert again["resumed_shards"] == len(first) - 1
    assert _digests(out) == first  # byte-identical after resuming
    # every sample decodes under the schema
    samples = _read(out)
    assert len(samples) == 50 - n_drop and all(s.people for s in samples.values())


def test_shards_sized_in_bytes_keep_their_layout_when_resumed(tmp_path):
    items = list(range(100))
    one = _tar_bytes(_item_sample(0))
    out = tmp_path / "shards"
    summary = convert_dataset(
        items, str, _item_sample, out, samples_per_shard=None, val_fraction=0, shard_bytes=20 * one
    )
    # the probe's mean sample size gives the count; shards land near the requested size
    probe = [_tar_bytes(r) for r in map(_item_sample, items[:16]) if not isinstance(r, Drop)]
    assert summary["samples_per_shard"] == int(20 * one * len(probe) // sum(probe)) == 20
    # (tar pads to 10 KiB records, and a seventh of the items are dropped)
    sizes = [p.stat().st_size for p in sorted(out.glob("train-*.tar"))]
    assert len(sizes) == 5 and all(0.75 * 20 * one < size < 1.25 * 20 * one for size in sizes)
    assert json.loads((out / "layout.json").read_text()) == {"samples_per_shard": 20}
    with pytest.raises(SystemExit, match=r"layout\.json.*samples_per_shard=20, not 8"):
        convert_dataset(items, str, _item_sample, out, samples_per_shard=8, val_fraction=0)
    assert parse_size("2GB") == 2 * 10**9
    with pytest.raises(ValueError, match="'lots'"):
        parse_size("lots")


def test_parallel_processes_give_the_same_shards(tmp_path):
    items = list(range(30))
    convert_dataset(items, str, _item_sample, tmp_path / "one", samples_per_shard=5)
    convert_dataset(
        items, str, partial(_item_sample), tmp_path / "two", samples_per_shard=5, processes=2
    )
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    photos = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.png")
    (photos / "astronaut.txt").write_text("an astronaut in a white suit holding a helmet\n")
    Image.fromarray(np.stack([skimage.data.camera()] * 3, -1)).save(photos / "camera.jpg")
    Image.fromarray(np.full((128, 128, 3), 200, np.uint8)).save(photos / "blank.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path_factory.mktemp("annotated")
    summary = annotate_main(["--images", str(photos), "--out", str(out), "--val-fraction", "0"])
    return out, summary


def test_annotator_finds_the_people_and_counts_the_rest(annotated):
    out, summary = annotated
    assert summary["train"]["written"] == 2
    assert summary["train"]["dropped"] == {"no_person": 1, "unreadable_image": 1}
    samples = _read(out)
    astronaut = samples["astronaut"]
    assert astronaut.caption == "an astronaut in a white suit holding a helmet"
    assert samples["camera"].caption == "a photo of a person"
    (person,) = astronaut.people
    nose, l_sh, r_sh = person.body[0], person.body[5], person.body[6]
    assert nose[1] < l_sh[1] and l_sh[0] > nose[0] > r_sh[0]
    assert 150 < nose[0] < 300 and 60 < nose[1] < 200
    assert astronaut.mask is not None and astronaut.mask.shape == (512, 512)


def test_annotated_shards_feed_the_datamodules(annotated):
    out, _ = annotated
    dm = FullBodyDataModule(
        str(out / "train-*.tar"), batch_size=2, resampled=False, body={"resolution": 64}
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 64, 64)
    assert batch["pose_image"].sum() > 0


def _hagrid_fixture(root):
    """Three images in HaGRID's published layout: v2 with landmarks (one box per hand), v1
    without landmarks, and an annotation whose image is missing."""
    from datamodules.synthetic import draw_person

    rng = np.random.default_rng(3)
    (root / "images" / "like").mkdir(parents=True)
    (root / "annotations" / "train").mkdir(parents=True)
    annotations, expected = {}, {}
    for image_id in ("0a1b", "0c2d"):
        pixels, _, record = draw_person(rng, 256)
        Image.fromarray(pixels).resize((320, 256)).save(
            root / "images" / "like" / f"{image_id}.jpg"
        )
        person = record["people"][0]
        boxes, marks = [], []
        for side in ("left_hand", "right_hand"):
            kp = np.array(person[side] if person[side] is not None else [[10, 10, 2]] * 21)
            norm = kp[:, :2] / 256.0  # record coordinates are in the 256x256 image
            marks.append(norm.round(6).tolist())
            lo, hi = norm.min(0), norm.max(0)
            boxes.append([*lo.tolist(), *(hi - lo).tolist()])
        expected[image_id] = marks
        annotations[image_id] = {
            "bboxes": boxes,
            "labels": ["like", "no_gesture"],
            "user_id": f"user-{image_id}",
            "hand_landmarks": marks,
        }
    annotations["0c2d"].pop("hand_landmarks")  # v1: no landmarks...
    annotations["0c2d"]["leading_hand"] = "right"  # ...but a leading hand
    annotations["ffff"] = {"bboxes": [[0.1, 0.1, 0.2, 0.2]], "labels": ["like"], "user_id": "u"}
    (root / "annotations" / "train" / "like.json").write_text(json.dumps(annotations))
    return expected


def test_hagrid_converter_on_published_format(tmp_path):
    from datamodules.convert_hagrid import main as hagrid_main

    expected = _hagrid_fixture(tmp_path / "hagrid")
    out = tmp_path / "shards"
    summary = hagrid_main(
        ["--src", str(tmp_path / "hagrid"), "--out", str(out), "--val-fraction", "0"]
    )
    dropped = summary["train"]["dropped"]
    assert dropped.get("missing_image") == 1
    samples = _read(out)
    assert "0a1b" in samples
    sample = samples["0a1b"]
    assert sample.image.size == (320, 256)
    assert sample.caption == "a person showing a like gesture"
    (person,) = sample.people
    hands = [h for h in (person.left_hand, person.right_hand) if h is not None]
    # normalised landmarks -> pixels of the 320x256 image, by hand: x * 320, y * 256
    given = [np.array(m) * [320, 256] for m in expected["0a1b"]]
    for hand in hands:
        assert any(np.allclose(hand[:, :2], g, atol=0.01) for g in given)
    assert summary["train"]["written"] + sum(dropped.values()) == 3
    # the v1 image has no landmarks: MediaPipe fills them in or the sample is dropped, counted
    assert "0c2d" in samples or dropped.get("no_hand_landmarks") == 1


def test_interhand_projection_and_reordering(tmp_path):
    """A fixture in InterHand2.6M's published format: one camera, two frames; the projection
    and the joint reordering are checked against hand-computed values."""
    from datamodules.convert_interhand import INTERHAND_TO_SCHEMA
    from datamodules.convert_interhand import main as interhand_main

    root = tmp_path / "ih"
    ann = root / "annotations" / "train"
    ann.mkdir(parents=True)
    img_dir = root / "images" / "train" / "Capture0" / "ROM01" / "cam400002"
    img_dir.mkdir(parents=True)
    # camera: identity rotation, at the origin, f = 100, principal point (160, 120)
    camera = {
        "campos": {"400002": [0, 0, 0]},
        "camrot": {"400002": np.eye(3).tolist()},
        "focal": {"400002": [100, 100]},
        "princpt": {"400002": [160, 120]},
    }
    world = np.zeros((42, 3))
    world[:, 2] = 1000  # 1 m in front
    world[:21, 0] = np.arange(21) * 10  # right hand: joint j at x = 10 j mm
    world[:21, 1] = 50
    world[21:, 0] = -np.arange(21) * 10  # left hand mirrored
    world[21:, 1] = -50
    valid = [1] * 42
    images, joints = [], {"0": {}}
    for n, frame in enumerate((0, 1, 10)):
        name = f"Capture0/ROM01/cam400002/image{frame:05d}.jpg"
        Image.fromarray(np.full((240, 320, 3), 128, np.uint8)).save(root / "images/train" / name)
        images.append(
            {
                "id": n,
                "file_name": name,
                "width": 320,
                "height": 240,
                "capture": 0,
                "camera": "400002",
                "frame_idx": frame,
            }
        )
        joints["0"][str(frame)] = {
            "world_coord": world.tolist(),
            "joint_valid": valid,
            "hand_type": "interacting",
        }
    (ann / "InterHand2.6M_train_data.json").write_text(
        json.dumps({"images": images, "annotations": []})
    )
    (ann / "InterHand2.6M_train_camera.json").write_text(json.dumps({"0": camera}))
    (ann / "InterHand2.6M_train_joint_3d.json").write_text(json.dumps(joints))
    out = tmp_path / "shards"
    summary = interhand_main(
        ["--src", str(root), "--out", str(out), "--every", "10", "--val-fraction", "0"]
    )
    assert summary["items"] == 2  # frame 1 subsampled away
    samples = [sample for _, sample in sorted(_read(out).items())]
    assert len(samples) == 2
    (person,) = samples[0].people
    # u = 100 * x / 1000 + 160 = x / 10 + 160 ; v = 100 * 50 / 1000 + 120 = 125
    right = person.right_hand
    assert right[0].tolist() == [20 * 1.0 + 160, 125.0, 2.0]  # schema wrist = InterHand joint 20
    assert right[4].tolist() == [0 + 160.0, 125.0, 2.0]  # thumb tip = InterHand joint 0
    assert right[1].tolist() == [3 + 160.0, 125.0, 2.0]  # thumb base = InterHand joint 3
    assert person.left_hand[0].tolist() == [160 - 20.0, 115.0, 2.0]
    assert sorted(INTERHAND_TO_SCHEMA) == list(range(21))
    assert samples[0].caption == "a close-up photo of two hands"


def _reinterhand_fixture(root):
    """Two captures in Re:InterHand's published layout: a pinhole and a fisheye camera."""
    from datamodules.convert_reinterhand import TEST_CAPTURES

    cameras = {
        "400262": {"R": np.eye(3).tolist(), "t": [0, 0, 0], "focal": [100, 100],
                   "princpt": [160, 120]},
        "401645": {"R": np.eye(3).tolist(), "t": [0, 0, 500], "focal": [80, 90],
                   "princpt": [150, 110], "D": [0.1, -0.02, 0.003, 0.0]},
    }  # fmt: skip
    hand = np.zeros((24, 3))
    hand[:, 0] = np.arange(24) * 10  # joint j at x = 10 j mm, 1 m in front, y = 50 mm
    hand[:, 1], hand[:, 2] = 50, 1000
    for capture in ("m--20230101--0000--ABC123--two-hands", TEST_CAPTURES[0]):
        base = root / "data" / capture
        (base / "Mugsy_cameras").mkdir(parents=True)
        (base / "Mugsy_cameras" / "cam_params.json").write_text(json.dumps(cameras))
        for side, sign in (("right", 1), ("left", -1)):
            (base / "orig_fits" / side / "Keypoints").mkdir(parents=True)
            for frame in (0, 6, 12, 18):
                world = hand * (sign, sign, 1)
                if frame == 12:
                    world = world * (1, 1, -1)  # behind every camera
                if frame == 6 and side == "left":
                    continue  # no left-hand fit for this frame
                name = f"keypoint-{frame:06d}.json"
                (base / "orig_fits" / side / "Keypoints" / name).write_text(
                    json.dumps(world.tolist())
                )
        for camera in cameras:
            images = base / "Mugsy_cameras" / "envmap_per_frame" / "images" / camera
            images.mkdir(parents=True)
            for frame in (0, 6, 12, 18):
                Image.fromarray(np.full((240, 320, 3), 100, np.uint8)).save(
                    images / f"{frame:06d}.png"
                )
    return cameras, hand


def test_reinterhand_projection_reordering_and_split(tmp_path):
    from datamodules.convert_reinterhand import REINTERHAND_TO_SCHEMA
    from datamodules.convert_reinterhand import main as reinterhand_main

    cameras, hand = _reinterhand_fixture(tmp_path / "reih")
    out = tmp_path / "shards"
    summary = reinterhand_main(
        ["--src", str(tmp_path / "reih"), "--out", str(out), "--every", "1", "--val-fraction", "0"]
    )
    # train split: one capture x two cameras x four frames; frame 12 lies behind the cameras
    assert summary["items"] == 8
    assert summary["train"]["written"] == 6
    assert summary["train"]["dropped"] == {"no_valid_hand": 2}
    samples = _read(out)
    pinhole = samples["reih_m--20230101--0000--ABC123--two-hands_400262_000000"]
    (person,) = pinhole.people
    # u = 100 * x / 1000 + 160 with schema joint k = Re:InterHand joint REINTERHAND_TO_SCHEMA[k]
    expected_u = 160 + np.asarray(REINTERHAND_TO_SCHEMA) * 1.0
    np.testing.assert_allclose(person.right_hand[:, 0], expected_u)
    np.testing.assert_allclose(person.right_hand[:, 1], 125.0)  # v = 100 * 50 / 1000 + 120
    np.testing.assert_allclose(person.left_hand[:, 0], 320 - expected_u)
    assert person.right_hand[1, 0] == 162.0  # schema thumb base = thumb 1, thumb 0 dropped
    assert person.right_hand[17, 0] == 179.0  # schema pinky base = pinky 1 (index 19)
    assert pinhole.caption == "a close-up photo of two hands"
    only_right = samples["reih_m--20230101--0000--ABC123--two-hands_400262_000006"]
    assert only_right.people[0].left_hand is None
    assert only_right.caption == "a close-up photo of a right hand"
    # fisheye camera: Kannala-Brandt, written out independently of OpenCV
    fish = cameras["401645"]
    cam = hand[list(REINTERHAND_TO_SCHEMA)] + (0, 0, 500)
    a, b = cam[:, 0] / cam[:, 2], cam[:, 1] / cam[:, 2]
    r = np.hypot(a, b)
    theta = np.arctan(r)
    k = fish["D"]
    theta_d = theta * (1 + k[0] * theta**2 + k[1] * theta**4 + k[2] * theta**6 + k[3] * theta**8)
    u = fish["focal"][0] * a * theta_d / r + fish["princpt"][0]
    v = fish["focal"][1] * b * theta_d / r + fish["princpt"][1]
    fisheye = samples["reih_m--20230101--0000--ABC123--two-hands_401645_000000"]
    np.testing.assert_allclose(fisheye.people[0].right_hand[:, :2], np.stack([u, v], 1), atol=0.01)
    # the dataset's own test captures are a separate split; --every subsamples in frame order
    test_out = tmp_path / "test_shards"
    test = reinterhand_main(["--src", str(tmp_path / "reih"), "--out", str(test_out),
                             "--split", "test", "--every", "2", "--val-fraction", "0"])  # fmt: skip
    assert test["items"] == 4 and test["train"]["dropped"] == {"no_valid_hand": 2}
    assert {s.source["frame"] for s in _read(test_out).values()} == {0}
    # the hand generator's datamodule reads the result: 6 samples, 10 hands
    dm = HandDataModule(str(out / "train-*.tar"), batch_size=10, resampled=False,
                        crop={"resolution": 64, "min_crop_size": 8})  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (10, 3, 64, 64) and batch["pose_image"].sum() > 0


def _coco_body(rng, width, height):
    kp = np.zeros((17, 3))
    kp[:, 0] = rng.uniform(10, width - 10, 17).round(1)
    kp[:, 1] = rng.uniform(10, height - 10, 17).round(1)
    kp[:, 2] = 0.9
    return kp


def test_laion_human_needs_trust_and_keeps_the_keypoints(tmp_path):
    from datamodules.convert_laion_human import main as laion_main

    rng = np.random.default_rng(0)
    root = tmp_path / "laion"
    (root / "images").mkdir(parents=True)
    (root / "poses").mkdir()
    mapping, bodies = {}, {}
    for n in range(3):
        Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(root / f"images/{n}.jpg")
        body = _coco_body(rng, 128, 96)
        body[3] = [500, 500, 0.8]  # off the image: must become unlabelled
        bodies[str(n)] = body
        people = np.empty(1, dtype=object)
        people[0] = {"keypoints": body}
        np.savez(root / f"poses/{n}.npz", people)
        mapping[str(n)] = {
            "img_path": f"images/{n}.jpg",
            "pose_path": f"poses/{n}.npz",
            "prompt": f"a person number {n}",
        }
    (root / "poses/2.npz").write_bytes(b"garbage")
    (root / "mapping_file_training.json").write_text(json.dumps(mapping))
    out = tmp_path / "shards"
    with pytest.raises(SystemExit, match="--trust-pickle"):
        laion_main(["--src", str(root), "--out", str(out)])
    summary = laion_main(
        ["--src", str(root), "--out", str(out), "--trust-pickle", "--val-fraction", "0"]
    )
    assert summary["train"]["written"] == 2 and summary["train"]["dropped"] == {"bad_pose_file": 1}
    samples = _read(out)
    body = samples["0"].people[0].body
    expected = bodies["0"].copy()
    expected[3] = 0
    np.testing.assert_allclose(body, expected, atol=0.005)
    assert samples["1"].caption == "a person number 1"


def test_humanart_coco_keypoints_and_descriptions(tmp_path):
    from datamodules.convert_humanart import main as humanart_main

    rng = np.random.default_rng(1)
    root = tmp_path / "humanart"
    (root / "images/2D_virtual_human/cartoon").mkdir(parents=True)
    images, annotations = [], []
    for n in range(2):
        name = f"images/2D_virtual_human/cartoon/{n:06d}.jpg"
        Image.fromarray(np.full((80, 120, 3), 60, np.uint8)).save(root / name)
        images.append(
            {
                "id": n + 1,
                "file_name": name,
                "width": 120,
                "height": 80,
                "category": "cartoon",
                "description": "a cartoon hero" if n else "",
            }
        )
        annotations.append(
            {
                "id": n + 1,
                "image_id": n + 1,
                "category_id": 1,
                "iscrowd": 0,
                "keypoints": _coco_body(rng, 120, 80).reshape(-1).tolist(),
                "num_keypoints": 17,
                "bbox": [0, 0, 120, 80],
            }
        )
    ann_file = root / "validation_humanart.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "person"}],
            }
        )
    )
    out = tmp_path / "shards"
    summary = humanart_main(["--src", str(root), "--annotations", str(ann_file), "--out", str(out)])
    assert summary["train"]["written"] == 2
    samples = _read(out)
    assert samples["humanart000000002"].caption == "a cartoon hero"
    assert samples["humanart000000001"].caption == "a cartoon image of people"
    np.testing.assert_allclose(
        samples["humanart000000001"].people[0].body.reshape(-1),
        annotations[0]["keypoints"],
        atol=0.005,
    )


def test_annotator_keeps_every_person_of_a_real_street_photo(tmp_path):
    # The legacy annotator kept one person per photo (MediaPipe's pose graph finds one)
    photos = tmp_path / "photos"
    photos.mkdir()
    real = Path(__file__).parent / "data" / "real_photos"
    for name in ("crowdpose_103319.jpg", "panoptic_ex2_2_000040_l.jpg"):
        (photos / name).write_bytes((real / name).read_bytes())
    summary = annotate_main(["--images", str(photos), "--out", str(tmp_path / "out"),
                             "--val-fraction", "0"])  # fmt: skip
    assert summary["train"]["written"] == 2
    samples = _read(tmp_path / "out")
    street = samples["crowdpose_103319"]
    bodies = [p for p in street.people if (p.body[:, 2] > 0).any()]
    assert len(bodies) >= 2
    assert sum(h is not None for p in bodies for h in (p.left_hand, p.right_hand)) >= 3
    assert street.source["estimator"] == {"backend": "mediapipe"}
    signer = samples["panoptic_ex2_2_000040_l"]
    assert any(p.left_hand is not None for p in signer.people)
    assert signer.mask is not None and signer.mask.any()  # her hands, on her
