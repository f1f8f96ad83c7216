"""A local web demo: one pose and a prompt, the methods of an evaluation config side by side.

    .venv/bin/python -m experiments.demo [--config experiments/eval/tiny.yaml]
        [--methods two_stage humansd plain_sd] [--host 127.0.0.1] [--port 7860]

Served to this machine only unless ``--host 0.0.0.0`` is given. The pose is a JSON file (the
sample schema or OpenPose, as ``experiments.sample`` reads it) or an image: a photo to detect
the pose in, or a skeleton image for the methods that take one as is (the others are left out
of that request). The same generation is an API call (``api_name="generate"``), e.g. with
``gradio_client``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo reports to no one

import gradio as gr

from experiments.config import ConfigError
from experiments.notices import configure_logging
from experiments.run import limit_threads
from experiments.sample import Pose, Sampler, read_photo, read_pose, read_skeleton


def generate(
    sampler: Sampler,
    pose_file: str | None,
    image: str | None,
    image_kind: str,
    prompt: str,
    methods: list[str],
    seed: float,
) -> list[tuple[str, str]]:
    """Gallery items ``(image path, caption)``: the skeleton, then one image per method."""
    if not methods:
        raise gr.Error("choose at least one method")
    try:
        if pose_file:
            pose: Pose = read_pose(pose_file)
        elif image:
            pose = read_skeleton(image) if image_kind == "skeleton" else read_photo(image)
        else:
            raise ConfigError("give a pose JSON or an image")
        items: list[tuple[str, str]] = []
        if pose.skeleton is not None:  # the methods that need keypoints sit this one out
            skipped = [m for m in methods if not sampler.takes_skeleton_images(m)]
            methods = [m for m in methods if m not in skipped]
            if not methods:
                raise ConfigError(f"{', '.join(skipped)} need keypoints: give a pose JSON or photo")
        for method in methods:
            generated = sampler(method, pose, prompt, int(seed), key="demo")
            if not items:
                items.append((str(generated[0].skeleton), "skeleton"))
            items += [(str(g.image), method) for g in generated]
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None
    return items


def build_demo(sampler: Sampler, methods: list[str]) -> gr.Blocks:
    """The page: pose inputs, prompt, methods and seed; a gallery of the results."""
    with gr.Blocks(title="handdiff") as demo:
        gr.Markdown("## handdiff: one pose, every method side by side")
        with gr.Row():
            with gr.Column():
                pose_file = gr.File(label="pose JSON (sample schema or OpenPose)", type="filepath")
                image = gr.Image(label="or an image", type="filepath")
                image_kind = gr.Radio(["photo", "skeleton"], value="photo", label="the image is")
                prompt = gr.Textbox(value="a person waving, full body photo", label="prompt")
                chosen = gr.CheckboxGroup(methods, value=methods, label="methods")
                seed = gr.Number(value=0, precision=0, label="seed")
                button = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="skeleton and methods", columns=len(methods) + 1)
        button.click(
            lambda *args: generate(sampler, *args),
            [pose_file, image, image_kind, prompt, chosen, seed],
            gallery,
            api_name="generate",
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=".venv/bin/python -m experiments.demo")
    parser.add_argument("--config", default="experiments/eval/tiny.yaml")
    parser.add_argument("--methods", nargs="+", help="default: every method of the config")
    parser.add_argument("--out", default="results/demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    configure_logging()
    limit_threads()
    sampler = Sampler(args.config, args.out)
    methods = args.methods or [m for m in sampler.methods if sampler.runnable(m)]
    print(f"images: {sampler.out_dir}/<method>/ (demo.png, demo_skeleton.png)")
    build_demo(sampler, methods).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
