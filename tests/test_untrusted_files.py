"""Files from users are data: a crafted checkpoint runs nothing, a crafted sample key writes
nothing outside the output folder."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch

from datamodules.converter import convert_dataset
from datamodules.schema import key_problem
from experiments.config import ConfigError
from experiments.run import load_trained, main
from lightning_modules.hand_generator import HandGenerator
from lightning_modules.predictor import inside
from tests.conftest import make_raw_sample, write_tar

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "extra": _Payload(marker)}, path)
    return path, marker


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    path, marker = _crafted_checkpoint(tmp_path)
    model = HandGenerator(components={"tiny": True})
    with pytest.raises(ConfigError, match=r"crafted\.ckpt.*holds more than weights"):
        load_trained(model, str(path))
    assert not marker.exists()


def test_export_and_predict_refuse_a_crafted_checkpoint(
    synthetic_dir, tmp_path, monkeypatch, capsys
):
    path, marker = _crafted_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    hand = str(ROOT / "experiments/hand/tiny.yaml")
    data = [f"data.params.train_shards={synthetic_dir}/train-*.tar", "data.params.val_shards=null"]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", hand, *data, f"ckpt_path={path}", "export_dir=out"])
    assert exit_info.value.code == 2
    assert "crafted.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                str(ROOT / "experiments/two_stage/tiny.yaml"),
                f"model.params.hand_config={hand}",
                f"model.params.hand_ckpt={path}",
                f"data.params.shards={synthetic_dir}/val-*.tar",
            ]
        )
    assert "crafted.ckpt" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize(
    "key, ok",
    [("sample-0001", True), ("a.b_c", True), ("../../x", False), ("/abs/x", False),
     ("a\\b", False), ("..", False), (".hidden", False), ("a\nb", False), ("", False),
     ("x" * 201, False)],
)  # fmt: skip
def test_key_rules(key, ok):
    assert (key_problem(key) is None) == ok


def test_crafted_keys_are_skipped_and_nothing_is_written_outside(tmp_path, monkeypatch):
    """A shard whose keys are absolute or climb out: predict writes only the good sample, in
    its folder, and names the others as skipped."""
    good = make_raw_sample("good", size=64)
    bad = [make_raw_sample(k, size=64) for k in (str(tmp_path / "abs"), "../../climb")]
    shard = write_tar(tmp_path / "crafted.tar", [good, *bad])
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    main(
        [
            "predict",
            str(ROOT / "experiments/plain_sd/sample_tiny.yaml"),
            f"data.params.shards={shard}",
            f"model.params.config={ROOT}/experiments/plain_sd/tiny.yaml",
            "model.params.out_dir=out",
            "model.params.num_inference_steps=1",
        ]
    )
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert written == [Path("a/b/out/good.png")]


def test_the_output_path_is_refused_outside_its_folder(tmp_path):
    assert inside(tmp_path, "k.png") == tmp_path / "k.png"
    for name in ("../k.png", "/etc/k.png"):
        with pytest.raises(ValueError, match="outside"):
            inside(tmp_path, name)


def test_converters_drop_keys_that_are_not_file_names(tmp_path):
    def convert(item):
        return {"__key__": item, "json": b"{}"}

    summary = convert_dataset(["ok", "../evil", "/abs"], lambda i: i, convert, tmp_path / "out")
    dropped = sum(summary[s]["dropped"].get("bad_key", 0) for s in ("train", "val"))
    written = sum(summary[s]["written"] for s in ("train", "val"))
    assert dropped == 2 and written == 1
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        assert all(".." not in n and not n.startswith("/") for n in tar.getnames())
