"""Shared latent-diffusion plumbing: components, frozen parts, noise, loss target, EMA,
optimiser, checkpoint slimming and export. A method subclasses :class:`LatentDiffusionModule`
and adds only its conditioning, loss terms and sampler wiring."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils.torch_utils import randn_tensor

from lightning_modules.components import ComponentsConfig, load_components
from lightning_modules.sampling import SamplerConfig, make_scheduler

# The VAE and text encoder are in eval mode on purpose (frozen); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


@dataclass
class OptimizerConfig:
    """AdamW and a diffusers learning-rate schedule (``constant``, ``constant_with_warmup``,
    ``cosine``, ``linear``, ...), stepped every optimiser step."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    schedule: str = "constant_with_warmup"
    warmup_steps: int = 0
    # one fused kernel for the whole update; None: fused on CUDA (not implemented on CPU)
    fused: bool | None = None


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (diffusers' ``EMAModel``)."""

    enabled: bool = False
    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_ema_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3
    foreach: bool = True  # one multi-tensor update on the device instead of a loop per tensor


def as_config(cls, value):
    """A dataclass instance from a dataclass, a mapping (YAML) or ``None`` (defaults)."""
    if isinstance(value, cls):
        return value
    return cls(**dict(value or {}))


class LatentDiffusionModule(L.LightningModule, ABC):
    """Stable-Diffusion-style training in latent space.

    The VAE and text encoder are frozen (no gradients, always in eval mode, cast to the
    autocast dtype) and left out of checkpoints, which hold only what is trained, the EMA and
    the optimiser state; a rebuild from the config restores them. Every parameter that still
    requires grad after the subclass's ``__init__`` is trained (and EMA-averaged).
    """

    frozen_modules: tuple[str, ...] = ("vae", "text_encoder")

    def __init__(
        self,
        components: ComponentsConfig | dict,
        optimizer: OptimizerConfig | dict | None = None,
        sampler: SamplerConfig | dict | None = None,
        ema: EMAConfig | dict | None = None,
        caption_dropout: float = 0.1,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        # build_node (a method's builder of nested config nodes) is a function, not a setting
        self.save_hyperparameters(logger=False, ignore=["build_node"])
        self.components_config = as_config(ComponentsConfig, components)
        self.optimizer_config = as_config(OptimizerConfig, optimizer)
        self.sampler_config = as_config(SamplerConfig, sampler)
        self.ema_config = as_config(EMAConfig, ema)
        self.caption_dropout = caption_dropout
        self.snr_gamma = snr_gamma
        self.compile_unet = compile
        self.channels_last = channels_last
        parts = load_components(self.components_config)
        self.unet = parts.unet
        self.vae = parts.vae
        self.text_encoder = parts.text_encoder
        self.tokenizer = parts.tokenizer
        self.noise_scheduler = parts.noise_scheduler
        # from_pretrained returns eval-mode modules, and Lightning keeps submodules' modes
        self.unet.train()
        for name in self.frozen_modules:
            getattr(self, name).requires_grad_(False).eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema: EMAModel | None = None

    # ----------------------------------------------------------------- frozen parts
    def freeze(self, name: str) -> None:
        """Freeze submodule ``name``: no gradients, always in eval mode, left out of
        checkpoints (a rebuild from the config restores it)."""
        getattr(self, name).requires_grad_(False).eval()
        if name not in self.frozen_modules:
            self.frozen_modules = (*self.frozen_modules, name)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_modules:
            frozen = getattr(self, name).eval()
            # adapters trained inside a frozen network keep their dropout
            for module_name, module in frozen.named_modules():
                if module_name.endswith("lora_dropout"):
                    module.train(mode)
        return self

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision) if self._trainer else "32"
        dtype = (
            torch.bfloat16
            if precision.startswith("bf16")
            else torch.float16
            if precision.startswith("16")
            else torch.float32
        )
        # Trained weights stay fp32 (fp16 weights cannot be unscaled); frozen ones need not.
        # What is trained inside a frozen network (LoRA adapters, a new token's embedding) is
        # left as it is: a round trip through bf16 would round it. Any nn.Module works (a
        # pose network for HumanSD's W has no diffusers-style .dtype).
        for name in self.frozen_modules:
            module = getattr(self, name)
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
            for b in module.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(dtype)

    def trained_networks(self) -> list[torch.nn.Module]:
        """The networks ``compile`` and ``channels_last`` apply to (the denoiser and what a
        method adds to it: a pose or inpainting ControlNet)."""
        controlnet = getattr(getattr(self, "conditioning", None), "controlnet", None)
        return [self.unet] + ([controlnet] if controlnet is not None else [])

    def configure_model(self) -> None:
        if getattr(self, "_configured", False):
            return
        for network in self.trained_networks():
            if self.channels_last:
                # NHWC convolutions on tensor cores; inputs follow the weights' layout
                network.to(memory_format=torch.channels_last)
            if self.compile_unet:
                network.compile()
        self._configured = True

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_size(self, batch: dict) -> tuple[int, int]:
        """``(H, W)`` of a batch's images, also of a latent cache's batch (which has none)."""
        if "image" in batch:
            return tuple(batch["image"].shape[-2:])
        return tuple(self.vae_scale * n for n in batch["latent_mean"].shape[-2:])

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, 4, H/8, W/8]`` (fp32): a sample
        of the VAE posterior, or its mode with ``sample=False``."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return self.scale_latents(posterior.mean, posterior.std if sample else None, generator)

    def scale_latents(
        self,
        mean: torch.Tensor,
        std: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """VAE posterior ``[B, 4, h, w]`` -> scaled latents (fp32): ``mean + std * eps`` with the
        draw diffusers' ``DiagonalGaussianDistribution.sample`` makes, or the mode without
        ``std``."""
        latents = (
            mean if std is None else mean + std * self.draw_noise(mean.shape, generator, mean.dtype)
        )
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def draw_noise(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """N(0, I) on this module's device, drawn as diffusers' ``randn_tensor`` draws it. A CPU
        generator's draw reaches a GPU through pinned memory without blocking the host (a
        plain copy from pageable memory would wait for the GPU every step)."""
        first = generator[0] if isinstance(generator, list) else generator
        if self.device.type != "cuda" or first is None or first.device.type != "cpu":
            return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
        return self.host_to_device(noise)

    def host_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on this module's device; to a GPU without a host synchronisation."""
        if self.device.type != "cuda" or tensor.device.type != "cpu":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def training_latents(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents ``[B, 4, h, w]`` of a training batch: a posterior sample of
        ``image``, or of a latent cache's ``latent_mean``/``latent_std`` with the draw diffusers'
        ``DiagonalGaussianDistribution.sample`` makes (the same noise for the same generator)."""
        if "latent_mean" not in batch:
            return self.encode_images(batch["image"], generator=generator)
        return self.scale_latents(batch["latent_mean"], batch["latent_std"], generator)

    def training_text(self, batch: dict, captions: list[str]) -> torch.Tensor:
        """Text states ``[B, 77, D]`` of the (possibly dropped) captions: the cache's
        ``text_embedding`` where the caption was kept, the encoder for the rest."""
        if "text_embedding" not in batch:
            return self.encode_prompts(captions)
        kept = [c == k for c, k in zip(captions, batch["caption"], strict=True)]
        text = batch["text_embedding"].float()
        if all(kept):
            return text
        dropped = [i for i, k in enumerate(kept) if not k]
        text = text.clone()
        text[dropped] = self.encode_prompts([captions[i] for i in dropped]).to(text)
        return text

    def cache_identity(self, text: bool) -> dict:
        """What a latent cache's tensors depend on in this model: the VAE's weights (a hash
        taken before any precision cast), its scaling, the pose condition's kind, and with
        ``text`` the text encoder's weights. Raises ValueError where cached text would be wrong
        (a text encoder that trains)."""
        if text and any(p.requires_grad for p in self.text_encoder.parameters()):
            raise ValueError(
                "the cache holds text-encoder states, but this model trains part of the text "
                "encoder (LoRA, textual inversion): write the cache without --text"
            )
        if not hasattr(self, "_weight_hashes"):
            self._weight_hashes = {}

        def weights_hash(name: str) -> str:
            if name not in self._weight_hashes:
                digest = hashlib.sha256()
                for key, value in sorted(getattr(self, name).state_dict().items()):
                    digest.update(key.encode())
                    digest.update(value.detach().float().cpu().numpy().tobytes())
                self._weight_hashes[name] = digest.hexdigest()
            return self._weight_hashes[name]

        identity = {
            "vae": weights_hash("vae"),
            "scaling_factor": self.vae.config.scaling_factor,
            "shift_factor": getattr(self.vae.config, "shift_factor", None),
            "pose_condition": type(getattr(self, "conditioning", None)).__name__,
        }
        if text:
            identity["text_encoder"] = weights_hash("text_encoder")
        return identity

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, 4, h, w]`` -> images ``[B, 3, 8h, 8w]`` in [0, 1] (fp32)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        images = self.vae.decode(latents.to(self.vae.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> CLIP hidden states ``[B, 77, D]`` (fp32, like the latents: the frozen
        encoder may run in bf16, and a bf16 key beside an fp32 query breaks attention outside
        autocast). Gradients flow only when part of the text encoder is trained (LoRA,
        textual inversion)."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        ids = self.host_to_device(ids)
        trains = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.text_encoder.parameters()
        )
        with torch.set_grad_enabled(trains):
            return self.text_encoder(ids)[0].float()

    def drop_captions(
        self, captions: list[str], generator: torch.Generator | None = None
    ) -> list[str]:
        """Replace each caption by "" with probability ``caption_dropout`` (CFG training)."""
        keep = torch.rand(len(captions), generator=generator) >= self.caption_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]

    # ----------------------------------------------------------------- diffusion loss
    def add_noise(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward process q(z_t | z_0): returns ``(noise, timesteps [B], noisy latents)``;
        ``timesteps`` drawn uniformly unless given."""
        b = latents.shape[0]
        noise = self.draw_noise(latents.shape, generator, latents.dtype)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator
            )
        timesteps = self.host_to_device(timesteps)
        return noise, timesteps, self.noise_scheduler.add_noise(latents, noise, timesteps)

    def loss_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet predicts, by the scheduler's ``prediction_type``."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def denoising_loss(
        self,
        prediction: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """L_LDM = E ||target - model output||^2 (Rombach et al. 2022, eq. 2), the target set by
        the scheduler's ``prediction_type``; Min-SNR-gamma weighting (Hang et al. 2023) if set."""
        kind = self.noise_scheduler.config.prediction_type
        target = self.loss_target(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
        if self.snr_gamma is None:
            return per_sample.mean()
        snr = compute_snr(self.noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        return (per_sample * weight).mean()

    # ----------------------------------------------------------------- steps
    @abstractmethod
    def losses(
        self, batch: dict, train: bool, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss terms of a batch; ``loss`` is the one optimised."""

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The random draws of one training batch (noise, timesteps, posterior samples, caption
        and pose dropout), seeded by (run seed, step, batch, rank): a resumed run draws what
        the uninterrupted run drew, which the global RNG, not saved in checkpoints, cannot."""
        key = f"{torch.initial_seed()}/{self.global_step}/{batch_idx}/{self.global_rank}"
        seed = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
        return torch.Generator().manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch, train=True, generator=self.step_generator(batch_idx))
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()},
            prog_bar=True,
            batch_size=len(batch["caption"]),
        )
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Same noise and timesteps every validation run, so the curve is comparable.
        generator = torch.Generator().manual_seed(batch_idx)
        with self.ema_weights():
            losses = self.losses(batch, train=False, generator=generator)
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()},
            sync_dist=True,
            batch_size=len(batch["caption"]),
        )

    # ----------------------------------------------------------------- EMA
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _make_ema(self) -> None:
        cfg = self.ema_config
        self.ema = EMAModel(
            self.trainable_parameters(),
            decay=cfg.decay,
            min_decay=cfg.min_decay,
            update_after_step=cfg.update_after_step,
            use_ema_warmup=cfg.use_ema_warmup,
            inv_gamma=cfg.inv_gamma,
            power=cfg.power,
            foreach=cfg.foreach,
        )

    def on_fit_start(self) -> None:
        if self.ema_config.enabled and self.ema is None:
            self._make_ema()
        if self.ema is not None:
            self.ema.to(self.device)

    def optimizer_step(self, *args, **kwargs) -> None:
        # The EMA follows each optimiser step at once (not per micro-batch under gradient
        # accumulation), before any callback of that step, so the checkpoint a step writes
        # holds that step's EMA.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step(self.trainable_parameters())

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights into the model (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def bake_ema(self) -> None:
        """Copy the EMA weights into the model for good and drop the EMA: a model loaded for
        sampling only then runs each call without :meth:`ema_weights`' three full-parameter
        copies (store, copy in, restore), which timed runs would otherwise include."""
        if self.ema is not None:
            self.ema.copy_to(self.trainable_parameters())
            self.ema = None

    # ----------------------------------------------------------------- checkpoints
    def _is_frozen_key(self, key: str) -> bool:
        return key.split(".", 1)[0] in self.frozen_modules

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what is trained inside a frozen network (adapters, new embeddings) is kept
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if not self._is_frozen_key(k) or k in trained
        }
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights are not stored: take them from the freshly built components.
        own = self.state_dict()
        for key, value in own.items():
            if self._is_frozen_key(key):
                checkpoint["state_dict"].setdefault(key, value)
        if "ema" in checkpoint:
            if self.ema is None:
                self._make_ema()
            self.ema.load_state_dict(checkpoint["ema"])

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        cfg = self.optimizer_config
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            eps=cfg.eps,
            fused=self.device.type == "cuda" if cfg.fused is None else cfg.fused,
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        schedule = get_scheduler(
            cfg.schedule,
            optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------- sampling helpers
    def sampling_scheduler(self, name: str | None = None):
        return make_scheduler(name or self.sampler_config.scheduler, self.noise_scheduler.config)

    def export_diffusers(self, out_dir: str | os.PathLike) -> Path:
        """Write the trained UNet (EMA weights when on) and the scheduler in diffusers format,
        plus ``handdiff.json`` with the module's hyperparameters."""
        out = Path(out_dir)
        with self.ema_weights():
            self.unet.save_pretrained(out / "unet")
        self.noise_scheduler.save_pretrained(out / "scheduler")
        hparams = {k: (asdict(v) if is_dataclass(v) else v) for k, v in dict(self.hparams).items()}
        (out / "handdiff.json").write_text(
            json.dumps(
                {"class": type(self).__qualname__, "hparams": hparams}, indent=2, default=str
            )
        )
        return out
