"""Library notices that are not actionable for a handdiff user, filtered narrowly at their
source (by logger and exact text), so that what a run prints reads as its own."""

from __future__ import annotations

import logging
import warnings

# packages whose INFO lines a run shows; libraries (open_clip logs at INFO on the root logger,
# e.g. "Parsing tokenizer identifier") stay at WARNING
OWN_PACKAGES = ("experiments", "lightning_modules", "datamodules", "metrics", "pose_estimation")


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def configure_logging() -> None:
    """WARNING for libraries, INFO for handdiff's packages, and the notices below dropped:
    Lightning's advert for its cloud logger and its note that it uses our parameter summary;
    diffusers' warning that the frozen VAE has modules to keep in float32 when that list is
    empty (its cast to bf16 is deliberate, and with nothing to keep there is nothing to warn
    about); Lightning's use of a torch
    ``_pytree`` API that torch deprecated (nothing a user can change)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in OWN_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        _DropMessages("💡 Tip: For seamless cloud", "Skipping setting a default `ModelSummary`")
    )
    logging.getLogger("diffusers.models.modeling_utils").addFilter(
        _DropMessages("that should be kept in float32: [].")
    )
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
