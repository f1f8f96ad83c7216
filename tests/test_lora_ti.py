"""Hand LoRA, textual inversion and negative embeddings on tiny SD: what trains, the LoRA
equation by hand, diffusers loading what handdiff exports and sampling the same images, the
negative embedding in the unconditional branch, and malformed synthetic hands."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from datamodules.synthetic import draw_person
from lightning_modules.pose_conditioned import PoseConditionedDiffusion
from lightning_modules.textual_inversion import TextualInversion

SAMPLER = {"scheduler": "ddim", "num_inference_steps": 3, "guidance_scale": 7.5}


def lora_model(modules: str = "attention", **kw) -> PoseConditionedDiffusion:
    torch.manual_seed(0)
    model = PoseConditionedDiffusion(
        {"tiny": True}, conditioning="none", train_unet=False, sampler=SAMPLER,
        lora={"modules": modules}, **kw,
    )  # fmt: skip
    # trained adapters: B starts at zero, which would make every comparison trivial
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def batch(size: int = 64) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(2, 3, size, size, generator=gen) * 2 - 1,
        "pose_image": torch.zeros(2, 3, size, size),
        "caption": ["a hand", "two hands"],
    }


def one_step(model) -> dict[str, torch.Tensor]:
    """Parameters after one AdamW step on a batch (and before, as the returned dict's
    ``before``)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    loss = model.losses(batch(), train=True, generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return {"changed": changed, "before": before}


@pytest.mark.parametrize("modules", ["attention", "attention_conv"])
def test_only_the_adapters_train_and_each_module_set_gets_its_rank(modules):
    model = lora_model(modules)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert trainable == adapters
    # gradients reach the text encoder's adapters through the prompt encoding
    changed = one_step(model)["changed"]
    assert any(n.startswith("text_encoder.") for n in changed)
    assert any(n.startswith("unet.") for n in changed)
    params = dict(model.named_parameters())
    attention = params[
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight"
    ]
    assert attention.shape[0] == 32
    conv = [n for n in trainable if ".resnets.0.conv1.lora_A" in n]
    if modules == "attention":
        assert conv == []
    else:
        assert params[conv[0]].shape[0] == 8
        assert model.unet.down_blocks[0].resnets[0].conv1.scaling["default"] == 4 / 8


def test_lora_layer_computes_w0_plus_alpha_over_r_times_b_a():
    model = lora_model()
    layer = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w = layer.base_layer.weight + (1 / 32) * b @ a  # Hu et al. 2021, alpha = 1, r = 32
    expected = x @ w.T + (layer.base_layer.bias if layer.base_layer.bias is not None else 0)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def tiny_pipeline(model) -> StableDiffusionPipeline:
    """diffusers' own text-to-image pipeline on the same (base) tiny components."""
    from lightning_modules.components import build_tiny_components

    parts = build_tiny_components(0)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def handdiff_images(model, prompts, seed: int = 5, negative: str | None = None):
    return model.sample(
        torch.zeros(len(prompts), 3, 64, 64), prompts,
        generator=torch.Generator().manual_seed(seed), negative_prompt=negative,
    )  # fmt: skip


def diffusers_images(pipe, prompts, seed: int = 5, negative: str | None = None):
    return pipe(
        prompts, height=64, width=64, num_inference_steps=3, guidance_scale=7.5,
        negative_prompt=[negative or ""] * len(prompts),
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).images  # fmt: skip


@pytest.mark.parametrize("modules", ["attention", "attention_conv"])
def test_an_exported_lora_samples_the_same_images_in_diffusers(modules, tmp_path):
    model = lora_model(modules)
    model.export_diffusers(tmp_path)
    pipe = tiny_pipeline(model)
    without = diffusers_images(pipe, ["a hand"])
    pipe.load_lora_weights(str(tmp_path))
    ours, theirs = handdiff_images(model, ["a hand"]), diffusers_images(pipe, ["a hand"])
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (theirs - without).abs().max() > 1e-3  # the adapters did something


def test_components_lora_fuses_an_exported_lora_into_any_method(tmp_path):
    model = lora_model("attention_conv")
    model.export_diffusers(tmp_path)
    plain = PoseConditionedDiffusion(
        {"tiny": True, "lora": str(tmp_path)}, conditioning="none", sampler=SAMPLER
    ).eval()
    assert not any("lora_" in n for n, _ in plain.named_parameters())  # fused: plain networks
    assert torch.allclose(
        handdiff_images(plain, ["a hand"]), handdiff_images(model, ["a hand"]), atol=1e-5
    )
    # the ControlNet baseline on top of the hand LoRA is a config too: its UNet is the fused one
    controlnet = PoseConditionedDiffusion(
        {"tiny": True, "lora": str(tmp_path)}, conditioning="controlnet", train_unet=False
    )
    base = PoseConditionedDiffusion({"tiny": True}, conditioning="controlnet", train_unet=False)
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused = dict(controlnet.unet.named_parameters())[to_q]
    assert torch.equal(fused, dict(plain.unet.named_parameters())[to_q])
    assert not torch.equal(fused, dict(base.unet.named_parameters())[to_q])


def test_a_checkpoint_keeps_the_adapters_and_leaves_the_frozen_weights_out(tmp_path):
    model = lora_model()
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert kept and all("lora_" in k for k in kept)
    fresh = PoseConditionedDiffusion(
        {"tiny": True}, conditioning="none", train_unet=False, sampler=SAMPLER,
        lora={"modules": "attention"},
    )  # fmt: skip
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    for name, p in fresh.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name])


def test_lora_needs_a_frozen_plain_sd():
    with pytest.raises(ValueError, match="train_unet: false"):
        PoseConditionedDiffusion({"tiny": True}, conditioning="none", lora={})
    with pytest.raises(ValueError, match=r"components\.lora"):
        PoseConditionedDiffusion(
            {"tiny": True}, conditioning="controlnet", train_unet=False, lora={}
        )


def test_lora_dropout_is_active_in_training_only():
    model = PoseConditionedDiffusion(
        {"tiny": True}, conditioning="none", train_unet=False, lora={"dropout": 0.5}
    )
    dropouts = [m for n, m in model.unet.named_modules() if n.endswith("lora_dropout.default")]
    model.train()
    assert dropouts and all(m.training for m in dropouts) and not model.unet.training
    model.eval()
    assert not any(m.training for m in dropouts)


def test_exported_text_encoder_keys_use_the_lora_format_names(tmp_path):
    from safetensors.torch import load_file

    lora_model().export_diffusers(tmp_path)
    keys = load_file(str(tmp_path / "pytorch_lora_weights.safetensors")).keys()
    text = [k for k in keys if k.startswith("text_encoder.")]
    assert text and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text)


def ti_model(**kw) -> TextualInversion:
    torch.manual_seed(0)
    return TextualInversion({"tiny": True}, **{"sampler": SAMPLER, **kw})


def test_textual_inversion_trains_only_the_new_row_initialised_from_the_initializer():
    model = ti_model(token="<hand>", initializer="hand")
    table = model.text_encoder.get_input_embeddings()
    hand = model.tokenizer.encode("hand", add_special_tokens=False)[0]
    assert torch.equal(model.learned_embedding[0], table.base.weight[hand])
    assert model.tokenizer.encode("<hand>", add_special_tokens=False) == [model.token_id]
    result = one_step(model)
    assert result["changed"] == {"text_encoder.embeddings.token_embedding.extra"}
    captions = model.captions(["x", "y"], torch.Generator().manual_seed(0))
    assert all("<hand>" in c and c != "x" for c in captions)
    assert model.captions(["a man"], None) != ["a man"]
    kept = ti_model(keep_captions=True).captions(["a man"], None)
    assert kept == ["<hand>, a man"]


def test_exported_embedding_loads_in_diffusers_and_in_handdiff(tmp_path):
    model = ti_model(token="<hand>")
    with torch.no_grad():
        model.learned_embedding.normal_(0, 1)
    model.export_diffusers(tmp_path)
    pipe = tiny_pipeline(model)
    pipe.load_textual_inversion(str(tmp_path))
    prompts = ["a photo of a <hand>"]
    assert torch.allclose(
        handdiff_images(model, prompts), diffusers_images(pipe, prompts), atol=1e-5
    )
    loaded = PoseConditionedDiffusion(
        {"tiny": True, "textual_inversion": [str(tmp_path)]}, conditioning="none", sampler=SAMPLER
    ).eval()
    assert torch.allclose(
        handdiff_images(loaded, prompts), handdiff_images(model, prompts), atol=1e-5
    )


def test_a_negative_embedding_reaches_the_unconditional_branch():
    model = ti_model(token="<bad-hands>", sampler={**SAMPLER, "negative_prompt": "<bad-hands>"})
    with torch.no_grad():
        model.learned_embedding.normal_(0, 1)
    seen = []
    unet_forward = model.unet.forward
    model.unet.forward = lambda *a, **k: (
        seen.append(k["encoder_hidden_states"]),
        unet_forward(*a, **k),
    )[1]
    with_negative = handdiff_images(model, ["a person"])
    uncond = seen[0][:1]
    assert torch.equal(uncond, model.encode_prompts(["<bad-hands>"]))
    assert not torch.equal(uncond, model.encode_prompts([""]))
    # the learned row matters: another value of it changes the images
    with torch.no_grad():
        model.learned_embedding.normal_(0, 1)
    assert (handdiff_images(model, ["a person"]) - with_negative).abs().max() > 1e-3


def test_malformed_synthetic_hands_have_extra_fingers_and_the_same_keypoints():
    normal = draw_person(np.random.default_rng(3), 256)
    malformed = draw_person(np.random.default_rng(3), 256, malformed=True)
    assert malformed[2]["people"][0]["left_hand"] == normal[2]["people"][0]["left_hand"]
    assert malformed[2]["caption"] == normal[2]["caption"] + ", malformed hands with extra fingers"
    extra = (malformed[1] > 0) & ~(normal[1] > 0)
    assert extra.sum() > 20 and not ((normal[1] > 0) & ~(malformed[1] > 0)).any()
    changed = np.abs(malformed[0].astype(int) - normal[0].astype(int)).sum(-1) > 0
    assert changed[extra].mean() > 0.5
