"""Repair the hands of any folder of images with a trained HandRefiner.

    .venv/bin/python -m experiments.refine --images DIR --prompt "a person waving" [--out DIR]
    make refine IMAGES=DIR PROMPT="..." [ARGS="--strength adaptive --depth mesh ..."]

Every image of ``DIR`` (.png, .jpg, .jpeg, .webp) is refined on its own with its hands found by
MediaPipe (``--depth landmarks``, the release's detection) or a mesh model (``--depth mesh
--mesh-model M.onnx --mesh-faces F.npy``); prompts come from ``--prompt`` or, per image, from
``--prompts FILE.jsonl`` (the release's prompt file: one ``{"img": "<name>", "txt": "<prompt>"}``
per line). Writes ``<out>/<name>.png`` (the input itself when no hand is found),
``<out>/intermediate/<name>_depth_mask.png`` and ``<out>/report-rank0.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from datamodules.schema import key_problem
from experiments.config import ConfigError
from experiments.evaluate import ensure_trained
from experiments.notices import configure_logging
from experiments.run import limit_threads, load_module
from lightning_modules.refiner_predictor import IMAGE_SUFFIXES, RefinerPredictor


def image_keys(folder: Path) -> list[str]:
    """The stems of the images in ``folder``, refused when two files share one or a name
    could not be an output file name."""
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: no such folder")
    stems: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
            continue
        if file.stem in stems:
            raise ConfigError(f"--images: {stems[file.stem].name} and {file.name} share a name")
        problem = key_problem(file.stem)
        if problem:
            raise ConfigError(f"--images: {file.name}: {problem}")
        stems[file.stem] = file
    if not stems:
        raise ConfigError(f"--images {folder}: no .png/.jpg/.jpeg/.webp image")
    return list(stems)


def read_prompts(path: Path, keys: list[str]) -> dict[str, str]:
    """``{"img": name, "txt": prompt}`` lines -> prompt per image stem; every image needs one."""
    prompts = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            prompts[Path(str(entry["img"])).stem] = str(entry["txt"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f'--prompts {path}, line {number}: expected {{"img": ..., "txt": ...}}'
            ) from None
    missing = [k for k in keys if k not in prompts]
    if missing:
        raise ConfigError(f"--prompts {path}: no prompt for {', '.join(missing[:5])}")
    return prompts


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="experiments.refine", description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, type=Path, help="folder of images to repair")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt for every image")
    prompt.add_argument("--prompts", type=Path, help='JSON lines {"img": name, "txt": prompt}')
    parser.add_argument("--out", type=Path, default=Path("results/refined"))
    parser.add_argument("--config", default="experiments/refiner/tiny.yaml")
    parser.add_argument(
        "--ckpt", default="last", help="checkpoint file, 'last', or 'none' (the config's weights)"
    )
    parser.add_argument("--depth", choices=("landmarks", "mesh"), default="landmarks")
    parser.add_argument("--mesh-model", help="ONNX hand-mesh model (--depth mesh)")
    parser.add_argument("--mesh-faces", help=".npy [F, 3] faces of its mesh (--depth mesh)")
    parser.add_argument("--strength", default=None, help="control strength or 'adaptive'")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps")
    parser.add_argument("--feather", type=float, default=None, help="px of paste-back ramp")
    parser.add_argument(
        "--min-padding", type=int, default=30, help="px of mask padding (the release's 30)"
    )
    parser.add_argument(
        "--min-hand-size", type=float, default=16.0, help="px: smaller hands are left alone"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def refine_folder(args: argparse.Namespace) -> Path:
    keys = image_keys(args.images)
    prompts = read_prompts(args.prompts, keys) if args.prompts else dict.fromkeys(keys, args.prompt)
    depth_params = None
    if args.depth == "mesh":
        if not (args.mesh_model and args.mesh_faces):
            raise ConfigError("--depth mesh needs --mesh-model and --mesh-faces")
        depth_params = {"model": args.mesh_model, "faces": args.mesh_faces}
    strength = args.strength
    if strength is not None and strength != "adaptive":
        try:
            strength = float(strength)
        except ValueError:
            raise ConfigError(f"--strength {strength}: a number or 'adaptive'") from None
    if args.ckpt == "last":
        target = "lightning_modules.refiner_predictor.RefinerPredictor"
        ensure_trained({"refiner": {"target": target, "params": {"config": args.config}}}, [])
    ckpt = None if args.ckpt == "none" else args.ckpt
    predictor = RefinerPredictor(
        args.config, ckpt, base_images=str(args.images), depth=args.depth,
        depth_params=depth_params, strength=strength, num_inference_steps=args.steps,
        feather=args.feather, min_padding=args.min_padding, min_hand_size=args.min_hand_size,
        check_hands=False, out_dir=str(args.out), seed=args.seed,
        load_experiment=load_module,
    )  # fmt: skip
    if torch.cuda.is_available():
        predictor.to("cuda")
    predictor.on_predict_start()
    (predictor.out_dir / "report-rank0.jsonl").unlink(missing_ok=True)  # this run's report
    for key in tqdm(keys, desc="refining", unit="image"):
        batch = {"key": [key], "people": [[]], "caption": [prompts[key]]}
        predictor.write_outputs(batch, predictor.sample_batch(batch))
    return args.out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging()
    limit_threads()
    try:
        out = refine_folder(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"refined images: {out}/ (<name>.png, intermediate/, report-rank0.jsonl)")
    return out


if __name__ == "__main__":
    main()
