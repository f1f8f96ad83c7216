"""Person recall, hand recall, hand attribution and hand PCK of the auto-annotator on real
photos with human annotations (OCHuman, CrowdPose, MPII, InterHand2.6M, CMU Panoptic hands).

    python -m benchmarks.pose_stack --samples ../shared/real_samples [--json out.json]

Ground truth, per photo:

- people: the 12 limb joints every dataset labels (shoulders, elbows, wrists, hips, knees,
  ankles); a labelled person (>= 4 of them) is *recalled* when a detected person's same joints
  span a box with IoU >= 0.5 with theirs (one to one, greedy by IoU);
- hands: every hand with 21 labelled keypoints (Panoptic, InterHand2.6M; size = longest side
  of its keypoint box), and every labelled wrist of a labelled person with its elbow (OCHuman,
  CrowdPose, MPII; size estimated as 0.75 x the forearm, the hand-to-forearm ratio of adult
  anthropometry). Only hands of at least ``--min-hand-px`` (20) count. A hand is *found* when
  a detected hand's wrist lies within half the hand's size of it (one to one, least distance);
- attribution (hands of labelled people): a found hand is *right* when it is stored as that
  person's hand of that side, *wrong person* when stored on a detected person matched to
  another labelled person (or, when the owner was not recalled, on a person whose wrist on that
  side is not the labelled wrist), *wrong side* when on the right person's other side, and
  *hand-only* when kept as a hand-only entry. For hands without a labelled person (Panoptic,
  InterHand2.6M) only the side is checked, wherever the hand is stored;
- PCK@0.2: labelled keypoints of the found keypoint-labelled hands within 0.2 x the hand's
  size (the landmark model's accuracy; recall says how many were found).

Reports a markdown table per dataset and over all photos, and images/s of the annotator.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from datamodules.convert_interhand import INTERHAND_TO_SCHEMA, project
from datamodules.converter import read_rgb
from pose_estimation.attribution import HAND_TO_FOREARM
from pose_estimation.keypoints import keypoint_extent

COCO_LIMBS = tuple(range(5, 17))  # COCO-17 shoulders .. ankles, left before right
CROWDPOSE_LIMBS = tuple(range(12))
MPII_LIMBS = (13, 12, 14, 11, 15, 10, 3, 2, 4, 1, 5, 0)
# positions in the 12-joint order: elbows, wrists
ELBOW, WRIST = {"left": 2, "right": 3}, {"left": 4, "right": 5}


@dataclass
class TruthHand:
    wrist: np.ndarray  # [2]
    size: float
    side: str
    person: int | None = None  # index into Photo.people
    keypoints: np.ndarray | None = None  # [21, 3]


@dataclass
class Photo:
    dataset: str
    path: Path
    people: list[np.ndarray] = field(default_factory=list)  # [12, 3] each
    hands: list[TruthHand] = field(default_factory=list)


def _limbs(keypoints, order) -> np.ndarray:
    kp = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)[list(order)]
    kp[:, 2] = kp[:, 2] > 0
    return kp


def _wrist_hands(photo: Photo) -> None:
    for n, person in enumerate(photo.people):
        for side in ("left", "right"):
            wrist, elbow = person[WRIST[side]], person[ELBOW[side]]
            if wrist[2] and elbow[2]:
                size = HAND_TO_FOREARM * float(np.linalg.norm(wrist[:2] - elbow[:2]))
                photo.hands.append(TruthHand(wrist[:2], size, side, person=n))


def coco_style(root: Path, name: str, annotation: str, order) -> list[Photo]:
    data = json.loads((root / name / annotation).read_text())
    photos = {
        im["id"]: Photo(name, root / name / im["file_name"]) for im in data["images"]
    }  # fmt: skip
    for ann in data["annotations"]:
        kp = _limbs(ann["keypoints"], order)
        if kp[:, 2].sum() >= 4:
            photos[ann["image_id"]].people.append(kp)
    for photo in photos.values():
        _wrist_hands(photo)
    return list(photos.values())


def mpii(root: Path) -> list[Photo]:
    photos = {}
    for ann in json.loads((root / "mpii" / "test_mpii.json").read_text()):
        photo = photos.setdefault(ann["image"], Photo("mpii", root / "mpii" / ann["image"]))
        joints = np.concatenate([ann["joints"], np.array(ann["joints_vis"])[:, None]], 1)
        photo.people.append(_limbs(joints, MPII_LIMBS))
    for photo in photos.values():
        _wrist_hands(photo)
    return list(photos.values())


def panoptic(root: Path) -> list[Photo]:
    data = json.loads((root / "panoptic" / "test_panoptic.json").read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    photos = []
    for ann in data["annotations"]:
        name = names[ann["image_id"]]
        kp = np.asarray(ann["keypoints"], dtype=np.float64).reshape(21, 3)
        side = "left" if Path(name).stem.endswith("_l") else "right"
        hand = TruthHand(kp[0, :2], keypoint_extent(kp), side, keypoints=kp)
        photos.append(Photo("panoptic", root / "panoptic" / name, hands=[hand]))
    return photos


def interhand(root: Path) -> list[Photo]:
    folder = root / "interhand2.6m"
    data = json.loads((folder / "test_interhand2.6m_data.json").read_text())
    cameras = json.loads((folder / "test_interhand2.6m_camera.json").read_text())
    joints = json.loads((folder / "test_interhand2.6m_joint_3d.json").read_text())
    annotations = {a["image_id"]: a for a in data["annotations"]}
    photos = []
    for im in data["images"]:
        capture, camera = str(im["capture"]), str(im["camera"])
        cam = cameras[capture]
        cam = {k: cam[k][camera] for k in ("campos", "camrot", "focal", "princpt")}
        world = np.asarray(joints[capture][str(im["frame_idx"])]["world_coord"], dtype=np.float64)
        valid = np.asarray(annotations[im["id"]]["joint_valid"], dtype=np.float64).reshape(-1)
        uv, depth = project(world, cam)
        photo = Photo("interhand2.6m", folder / im["file_name"])
        for side, offset in (("right", 0), ("left", 21)):
            index = [offset + i for i in INTERHAND_TO_SCHEMA]
            ok = (valid[index] > 0) & (depth[index] > 0)
            if ok.sum() < 21:
                continue
            kp = np.concatenate([uv[index], np.full((21, 1), 2.0)], 1)
            photo.hands.append(TruthHand(kp[0, :2], keypoint_extent(kp), side, keypoints=kp))
        photos.append(photo)
    return photos


def load_photos(root: Path) -> list[Photo]:
    return [
        *coco_style(root, "ochuman", "test_ochuman.json", COCO_LIMBS),
        *coco_style(root, "crowdpose", "test_crowdpose.json", CROWDPOSE_LIMBS),
        *mpii(root),
        *panoptic(root),
        *interhand(root),
    ]


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    lo, hi = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(hi - lo, 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_people(truth: list[np.ndarray], detected: list[dict]) -> dict[int, int]:
    """Labelled person -> detected person, greedy by the IoU (>= 0.5) of the boxes that the
    labelled person's limb joints span in both."""
    pairs = []
    for t, person in enumerate(truth):
        labelled = person[:, 2] > 0
        box_t = np.r_[person[labelled, :2].min(0), person[labelled, :2].max(0)]
        for d, det in enumerate(detected):
            body = np.asarray(det["body"])[list(COCO_LIMBS)]
            ok = labelled & (body[:, 2] > 0)
            if ok.sum() < 2:
                continue
            box_d = np.r_[body[ok, :2].min(0), body[ok, :2].max(0)]
            iou = _box_iou(box_t, box_d)
            if iou >= 0.5:
                pairs.append((iou, t, d))
    matched: dict[int, int] = {}
    for _, t, d in sorted(pairs, reverse=True):
        if t not in matched and d not in matched.values():
            matched[t] = d
    return matched


def _owner_is(hand: TruthHand, owner: dict, side: str, matched: dict, index: int) -> bool:
    """Whether the detected person ``owner`` (``index``), holding ``hand`` on ``side``, is
    the hand's labelled person: matched to them, or, when that person was not recalled (a box
    IoU under 0.5, e.g. a mislocated leg), with their ``side`` wrist on the labelled wrist."""
    if hand.person in matched:
        return matched[hand.person] == index
    wrist = np.asarray(owner["body"])[9 if side == "left" else 10]
    return bool(wrist[2] > 0 and np.linalg.norm(wrist[:2] - hand.wrist) <= 0.5 * hand.size)


def detected_hands(people: list[dict]) -> list[tuple[np.ndarray, int, str, bool]]:
    """Every stored hand: ``(keypoints [21, 3], person index, side, hand-only entry)``."""
    out = []
    for n, person in enumerate(people):
        hand_only = not (np.asarray(person["body"])[:, 2] > 0).any()
        for side in ("left", "right"):
            hand = person.get(f"{side}_hand")
            if hand is not None:
                out.append((np.asarray(hand, dtype=np.float64), n, side, hand_only))
    return out


def score_photo(photo: Photo, people: list[dict], min_hand_px: float) -> dict[str, float]:
    counts = dict.fromkeys(
        ("people", "people_found", "hands", "hands_found", "right", "wrong_person",
         "wrong_side", "hand_only", "keypoints", "keypoints_correct"), 0
    )  # fmt: skip
    matched = match_people(photo.people, people)
    counts["people"], counts["people_found"] = len(photo.people), len(matched)
    truth = [h for h in photo.hands if h.size >= min_hand_px]
    found = detected_hands(people)
    counts["hands"] = len(truth)
    if truth and found:
        cost = np.array([[np.linalg.norm(f[0][0, :2] - t.wrist) / t.size for f in found]
                         for t in truth])  # fmt: skip
        for t, f in zip(*linear_sum_assignment(cost), strict=True):
            if cost[t, f] > 0.5:
                continue
            hand, person, side = truth[t], found[f][1], found[f][2]
            counts["hands_found"] += 1
            if found[f][3] and hand.person is not None:
                counts["hand_only"] += 1
            elif hand.person is not None and not _owner_is(hand, people[person], side, matched,
                                                           person):  # fmt: skip
                counts["wrong_person"] += 1
            elif side != hand.side:
                counts["wrong_side"] += 1
            else:
                counts["right"] += 1
            if hand.keypoints is not None:
                labelled = hand.keypoints[:, 2] > 0
                error = np.linalg.norm(
                    found[f][0][labelled, :2] - hand.keypoints[labelled, :2], axis=-1
                )
                counts["keypoints"] += int(labelled.sum())
                counts["keypoints_correct"] += int((error <= 0.2 * hand.size).sum())
    return counts


def summary(counts: dict[str, int]) -> dict[str, float]:
    def ratio(a: str, b: str) -> float:
        return counts[a] / counts[b] if counts[b] else float("nan")

    return {
        "person_recall": ratio("people_found", "people"),
        "hand_recall": ratio("hands_found", "hands"),
        "attribution_right": ratio("right", "hands_found"),
        "wrong_person": counts["wrong_person"],
        "wrong_side": counts["wrong_side"],
        "hand_only": counts["hand_only"],
        "hand_pck@0.2": ratio("keypoints_correct", "keypoints"),
        "people": counts["people"],
        "hands": counts["hands"],
    }


def markdown(rows: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(rows.values())))
    lines = ["| photos | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(photos: list[Photo], annotate, min_hand_px: float = 20.0) -> tuple[dict, float]:
    """Score ``annotate(pixels) -> list of schema people`` on ``photos``; returns the rows of
    the table and images/s."""
    totals: dict[str, dict[str, int]] = {}
    seconds = 0.0
    for photo in photos:
        pixels = read_rgb(photo.path)
        start = time.perf_counter()
        people = annotate(pixels)
        seconds += time.perf_counter() - start
        counts = score_photo(photo, people, min_hand_px)
        for name in (photo.dataset, "all"):
            row = totals.setdefault(name, dict.fromkeys(counts, 0))
            for k, v in counts.items():
                row[k] += v
    totals["all"] = totals.pop("all")
    return {name: summary(c) for name, c in totals.items()}, len(photos) / seconds


def main(argv: list[str] | None = None) -> dict:
    from datamodules.annotate import annotate_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="../shared/real_samples")
    parser.add_argument("--min-hand-px", type=float, default=20.0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if not Path(args.samples).is_dir():
        raise SystemExit(
            f"--samples {args.samples}: no such folder; it holds ochuman/, crowdpose/, mpii/, "
            "panoptic/ and interhand2.6m/ as in mmpose's tests/data (SAMPLES=... for make)"
        )
    photos = load_photos(Path(args.samples))
    annotate_image(read_rgb(photos[0].path))  # build the graphs outside the timing
    rows, speed = run(photos, lambda p: annotate_image(p)["people"], args.min_hand_px)
    print(markdown(rows))
    print(f"\nannotator: {speed:.2f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "images_per_s": speed}, indent=2))
    return rows


if __name__ == "__main__":
    main()
