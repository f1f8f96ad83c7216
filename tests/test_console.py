"""What runs print: library notices filtered by exact text, the progress bar and summary,
threads per process."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import torch

from experiments.notices import configure_logging
from experiments.run import limit_threads
from lightning_modules.console_callbacks import ParameterSummary, StepProgressBar


def test_only_the_known_notices_are_dropped(caplog):
    configure_logging()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    diffusers = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.INFO):
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try ...")
        rank_zero.info("GPU available: False, used: False")
        diffusers.warning("There are modules in AutoencoderKL that should be kept in float32: [].")
        diffusers.warning("There are modules in X that should be kept in float32: ['norm'].")
    messages = [r.getMessage() for r in caplog.records]
    assert "GPU available: False, used: False" in messages
    assert any("['norm']" in m for m in messages)  # a real list still warns
    assert not any("Tip" in m or "float32: []" in m for m in messages)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_logging()  # its filter goes in front of "always"
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, ...", FutureWarning, 2)
        warnings.warn("something else is deprecated", FutureWarning, 2)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_handdiff_packages_log_info_libraries_do_not(caplog):
    configure_logging()
    with caplog.at_level(logging.NOTSET):
        logging.getLogger("experiments.run").info("ours")
        logging.getLogger().info("Parsing tokenizer identifier. Schema: hf-hub")  # open_clip's
    assert logging.getLogger("experiments.run").isEnabledFor(logging.INFO)
    assert not logging.getLogger("open_clip").isEnabledFor(logging.INFO)


class _Trainer:
    max_epochs = -1
    max_steps = 300


def test_progress_bar_has_no_negative_epoch_total_and_no_version():
    bar = StepProgressBar()
    bar._trainer = _Trainer()
    assert bar._get_train_description(2) == "Epoch 2"
    _Trainer.max_epochs = 5
    assert bar._get_train_description(2).startswith("Epoch 2/4")


def test_parameter_summary_has_modes_and_no_flops(capsys):
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.trained = torch.nn.Linear(3, 4)
            self.frozen = torch.nn.Linear(4, 2).eval().requires_grad_(False)

    class Zero:
        is_global_zero = True

    ParameterSummary().on_fit_start(Zero(), Tiny())
    out = capsys.readouterr().out
    assert "trained" in out and "frozen" in out and "eval" in out and "FLOPs" not in out
    assert "trainable 16 of 26 parameters" in out


def test_threads_per_process(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("HANDDIFF_THREADS", "1")
        assert limit_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("HANDDIFF_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        torch.set_num_threads(2)
        assert limit_threads() == 1  # two processes share the cores
    finally:
        torch.set_num_threads(before)
