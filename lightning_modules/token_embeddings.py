"""New tokens in SD's text encoder: a trainable embedding row (textual inversion) and loading
learned embeddings in diffusers' ``learned_embeds.safetensors`` format."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

EMBEDS_FILE = "learned_embeds.safetensors"  # diffusers' name


class ExtendedEmbedding(nn.Module):
    """The text encoder's token embedding with new rows: ids below the original vocabulary
    size read the frozen table, the others ``extra`` ``[N, D]``."""

    def __init__(self, base: nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.base = base
        self.extra = nn.Parameter(extra)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table ``[V + N, D]`` (what ``get_input_embeddings().weight`` returns)."""
        return torch.cat([self.base.weight, self.extra.to(self.base.weight)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.num_embeddings
        new = ids >= vocab
        original = self.base(ids.clamp(max=vocab - 1))
        added = self.extra.to(original.dtype)[(ids - vocab).clamp(min=0)]
        return torch.where(new[..., None], added, original)


def add_token(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, token: str, initializer: str
) -> int:
    """Add ``token`` with a trainable embedding initialised from ``initializer``'s (one token
    of the vocabulary); returns its id."""
    if tokenizer.add_tokens(token) != 1:
        raise ValueError(f"token {token!r} is already in the tokenizer: choose another")
    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"initializer {initializer!r} must be a single token, got {len(ids)}")
    base = text_encoder.get_input_embeddings()
    if isinstance(base, ExtendedEmbedding):
        raise ValueError("the text encoder already learns a token: one per model")
    row = base.weight.detach()[ids[0]].clone()[None]
    text_encoder.set_input_embeddings(ExtendedEmbedding(base, row))
    return tokenizer.convert_tokens_to_ids(token)


def load_embeddings(path: str | os.PathLike, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel):
    """Load diffusers-format learned embeddings (a ``learned_embeds.safetensors`` file or a
    folder holding one; ``{token: [D] or [1, D]}``) as fixed new tokens."""
    path = Path(path)
    file = path / EMBEDS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"components.textual_inversion: {str(file)!r} does not exist")
    for token, vector in load_file(str(file)).items():
        vector = vector.reshape(-1, vector.shape[-1])
        if len(vector) != 1:
            raise ValueError(f"{file}: {token!r} has {len(vector)} vectors; one is supported")
        if tokenizer.add_tokens(token) != 1:
            raise ValueError(f"{file}: token {token!r} is already in the tokenizer")
        text_encoder.resize_token_embeddings(len(tokenizer))
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[tokenizer.convert_tokens_to_ids(token)] = vector[0].to(weight)
