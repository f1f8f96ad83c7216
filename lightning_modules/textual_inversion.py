"""Textual inversion (Gal et al. 2022): a new token whose embedding alone is learned, on a
frozen SD, with the denoising loss; as a "bad hands" negative embedding, a token learned on
malformed hands and put in the negative prompt at sampling.

Follows diffusers' ``examples/textual_inversion/textual_inversion.py``: the token is added to
the tokenizer and initialised from an initializer word's embedding; captions are templates
("a photo of a {}") with the token; constant AdamW; the result is saved as
``learned_embeds.safetensors`` (``{token: [1, D]}``) that ``StableDiffusionPipeline.
load_textual_inversion`` loads. One deviation, same result: diffusers trains the whole
embedding matrix and restores every other row after each step; here only the new row is a
parameter (:class:`ExtendedEmbedding`), so no other row can move and the optimiser holds one
row instead of 49 409.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_modules.components import ComponentsConfig
from lightning_modules.diffusion_module import EMAConfig, OptimizerConfig
from lightning_modules.pose_conditioned import PoseConditionedDiffusion
from lightning_modules.sampling import SamplerConfig
from lightning_modules.token_embeddings import EMBEDS_FILE, add_token

# diffusers' imagenet_templates_small for "object" learnables (a representative subset)
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}",
    "the photo of a {}", "a photo of a clean {}", "a photo of my {}",
    "a close-up photo of a {}", "a bright photo of the {}", "a good photo of the {}",
    "a photo of one {}", "a rendition of the {}", "a photo of the nice {}",
)  # fmt: skip


class TextualInversion(PoseConditionedDiffusion):
    """Plain SD (frozen) learning one token's embedding.

    ``token``/``initializer``: the new token and the word its embedding starts from.
    ``templates``: captions are one of these with the token (default: diffusers' object
    templates); with ``keep_captions`` the sample's caption is kept behind the token
    ("{token}, {caption}"). For a negative embedding (learned on malformed hands) set the sampler's
    ``negative_prompt`` to the token.
    """

    def __init__(
        self,
        components: ComponentsConfig | dict,
        token: str = "<hand>",
        initializer: str = "hand",
        templates: list[str] | None = None,
        keep_captions: bool = False,
        optimizer: OptimizerConfig | dict | None = None,
        sampler: SamplerConfig | dict | None = None,
        ema: EMAConfig | dict | None = None,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__(
            components=components,
            conditioning="none",
            train_unet=False,
            caption_dropout=0.0,
            optimizer=optimizer,
            sampler=sampler,
            ema=ema,
            snr_gamma=snr_gamma,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
            channels_last=channels_last,
        )
        self.templates = list(templates or OBJECT_TEMPLATES)
        if any("{}" not in t for t in self.templates):
            raise ValueError("every template needs a '{}' for the token")
        self.token = token
        self.keep_captions = keep_captions
        self.token_id = add_token(self.tokenizer, self.text_encoder, token, initializer)

    @property
    def learned_embedding(self) -> torch.Tensor:
        """The token's embedding ``[1, D]``."""
        return self.text_encoder.get_input_embeddings().extra

    def captions(self, captions: list[str], generator: torch.Generator | None) -> list[str]:
        """The training captions: a template per sample (drawn with ``generator``), or the
        sample's caption with the token appended."""
        if self.keep_captions:  # first: a caption over 77 tokens would cut it off at the end
            return [f"{self.token}, {c}" for c in captions]
        picks = torch.randint(len(self.templates), (len(captions),), generator=generator)
        return [self.templates[i].format(self.token) for i in picks.tolist()]

    def losses(self, batch: dict, train: bool, generator: torch.Generator | None = None):
        return super().losses(
            {**batch, "caption": self.captions(batch["caption"], generator)}, train, generator
        )

    def export_diffusers(self, out_dir: str | os.PathLike) -> Path:
        """``learned_embeds.safetensors`` (``{token: [1, D]}``, EMA weights when on), what
        ``load_textual_inversion`` and handdiff's ``components.textual_inversion`` load."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with self.ema_weights():
            vector = self.learned_embedding.detach().float().cpu().clone()
        save_file({self.token: vector}, str(out / EMBEDS_FILE))
        record = {"class": type(self).__qualname__, "token": self.token}
        (out / "handdiff.json").write_text(json.dumps(record, indent=2))
        return out
