"""CLIPSIM: text-image agreement as HumanSD reports it (CLIPScore with OpenAI CLIP ViT-B/16)."""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchvision.transforms.v2 import functional as TF


def tensor_preprocess(image_size: int, mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    """open_clip's PIL preprocessing (bicubic antialiased resize of the short side, centre
    crop, normalise) applied to image tensors ``[N, 3, H, W]`` in [0, 1]."""

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        images = TF.resize(
            images, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True
        )
        images = TF.center_crop(images, [image_size, image_size])
        return TF.normalize(images.clamp(0, 1), list(mean), list(std))

    return preprocess


class CLIPSim(Metric):
    """Mean over images of ``100 * max(cos(E_image, E_text), 0)`` (CLIPScore, Hessel et al.
    2021, without its w = 2.5 rescaling), the CLIPSIM of HumanSD's Table 1.

    ``update(images, captions)`` with images ``[N, 3, H, W]`` float in [0, 1] and N captions.
    With ``model=None`` it loads ``open_clip.create_model_and_transforms(model_name,
    pretrained)`` (OpenAI ViT-B/16 by default: a local checkpoint path or open_clip's cache;
    nothing is downloaded offline). Any open_clip model can be passed with its tokenizer;
    ``preprocess`` maps image tensors to the model's input (default: open_clip's resize, crop
    and normalisation, done on tensors).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        tokenizer: Callable | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_name: str = "ViT-B-16",
        pretrained: str = "openai",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if model is None:
            try:
                model, _, _ = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained
                )
            except Exception as exc:  # open_clip raises several types for missing weights
                raise FileNotFoundError(
                    f"CLIPSim: cannot load open_clip {model_name!r} weights {pretrained!r} "
                    f"({exc}). Offline, pass pretrained=/path/to/open_clip_pytorch_model.bin "
                    "(or a checkpoint in open_clip's cache), or pass model= and tokenizer="
                ) from exc
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer or open_clip.get_tokenizer(model_name)
        if preprocess is None:
            visual = model.visual
            size = visual.image_size
            preprocess = tensor_preprocess(
                size[0] if isinstance(size, tuple | list) else size,
                getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN,
                getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD,
            )
        self.preprocess = preprocess
        self.add_state(
            "score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def scores(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per-image ``100 * max(cos, 0)``: ``[N]``."""
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        pixels = self.preprocess(images.float()).to(self.device)
        tokens = self.tokenizer(list(captions)).to(self.device)
        image_emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return 100 * (image_emb * text_emb).sum(-1).clamp(min=0)

    def update(self, images: torch.Tensor, captions: list[str]) -> None:
        s = self.scores(images, captions)
        self.score_sum += s.double().sum()
        self.count += len(s)

    def compute(self) -> torch.Tensor:
        return (self.score_sum / self.count).float()
