# handdiff — every target that needs the environment depends on `install`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= experiments/hand/tiny.yaml
CONFIG_EVAL ?= experiments/eval/metrics_tiny.yaml
CONFIG_OUTPAINT ?= experiments/outpaint/tiny.yaml
CONFIG_HUMANSD ?= experiments/humansd/tiny.yaml
CONFIG_CONTROLNET ?= experiments/controlnet/tiny.yaml
CONFIG_REFINER ?= experiments/refiner/tiny.yaml
CONFIG_LORA ?= experiments/lora/tiny.yaml
CONFIG_TI ?= experiments/textual_inversion/tiny.yaml
ARGS ?=
SYNTHETIC := data/synthetic
MALFORMED := data/synthetic_malformed
export PYTHONUNBUFFERED = 1

.PHONY: help install shards test test-full train-hand train-outpaint train-humansd train-controlnet train-refiner train-lora train-ti synthetic-malformed sample-sd sample-two-stage eval ablations eval-metrics synthetic tensorboard lint export clean bench-pose bench-loop sample demo refine cache-latents train-hand-cached

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-nodeps.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	# one OpenCV, installed last: mediapipe/mmcv would otherwise overwrite the cv2 folder
	$(PY) -m pip install -q --no-deps --force-reinstall opencv-python-headless==4.11.0.86
	$(PY) -c "import cv2, mediapipe, numpy; assert numpy.__version__.startswith('1.'), numpy.__version__"
	touch $(STAMP)

install: $(STAMP) ## create .venv with the pinned environment (idempotent, fast when done)

$(SYNTHETIC)/.done: $(STAMP) datamodules/synthetic.py
	$(PY) -m datamodules.synthetic --out $(SYNTHETIC) --n 256 --val 32 --per-shard 16 --seed 0
	touch $@

synthetic: $(SYNTHETIC)/.done ## build the built-in synthetic shards (data/synthetic)

$(MALFORMED)/.done: $(STAMP) datamodules/synthetic.py
	$(PY) -m datamodules.synthetic --out $(MALFORMED) --n 16 --val 8 --per-shard 16 --seed 1 --malformed
	touch $@

synthetic-malformed: $(MALFORMED)/.done ## synthetic people with extra fingers (data/synthetic_malformed), for negative embeddings

train-hand: $(SYNTHETIC)/.done ## train the stage-1 hand generator (CONFIG=..., ARGS="key=value ...")
	$(PY) -m experiments.run fit $(CONFIG) $(ARGS)

train-outpaint: $(SYNTHETIC)/.done ## train the stage-2 ControlNet outpainter (CONFIG_OUTPAINT=..., ARGS=...)
	$(PY) -m experiments.run fit $(CONFIG_OUTPAINT) $(ARGS)

train-humansd: $(SYNTHETIC)/.done ## train the HumanSD baseline (CONFIG_HUMANSD=..., ARGS=...)
	$(PY) -m experiments.run fit $(CONFIG_HUMANSD) $(ARGS)

train-controlnet: $(SYNTHETIC)/.done ## train the ControlNet pose baseline (CONFIG_CONTROLNET=..., ARGS=...)
	$(PY) -m experiments.run fit $(CONFIG_CONTROLNET) $(ARGS)

train-refiner: $(SYNTHETIC)/.done ## train HandRefiner's depth ControlNet (CONFIG_REFINER=..., ARGS=...)
	$(PY) -m experiments.run fit $(CONFIG_REFINER) $(ARGS)

train-lora: $(SYNTHETIC)/.done ## train a hand LoRA on frozen SD (CONFIG_LORA=..., ARGS=...)
	$(PY) -m experiments.run fit $(CONFIG_LORA) $(ARGS)

train-ti: $(SYNTHETIC)/.done $(MALFORMED)/.done ## textual inversion of a hand token (CONFIG_TI=...; negative embedding: CONFIG_TI=experiments/textual_inversion/negative_tiny.yaml)
	$(PY) -m experiments.run fit $(CONFIG_TI) $(ARGS)

CACHE_OUT ?= data/latent_cache/hand_tiny
cache-latents: $(SYNTHETIC)/.done ## VAE latents of CONFIG's training crops, once (CACHE_OUT=dir, ARGS="--text"); train with data.params.latent_cache=dir
	$(PY) -m experiments.cache_latents $(CONFIG) --out $(CACHE_OUT) $(ARGS)

# the tiny hand generator's own cache, rewritten when the synthetic shards are
TINY_CACHE := data/latent_cache/hand_tiny
$(TINY_CACHE)/cache.json: $(SYNTHETIC)/.done
	$(PY) -m experiments.cache_latents experiments/hand/tiny.yaml --out $(TINY_CACHE) --overwrite

train-hand-cached: $(TINY_CACHE)/cache.json ## the tiny hand generator from its latent cache (written first if missing)
	$(PY) -m experiments.run fit experiments/hand/tiny_cached.yaml $(ARGS)

sample-sd: $(SYNTHETIC)/.done ## plain SD baseline images for the synthetic val prompts
	$(PY) -m experiments.run predict experiments/plain_sd/sample_tiny.yaml $(ARGS)

sample-two-stage: $(SYNTHETIC)/.done ## two-stage sampling of the synthetic val poses (trains the tiny stages if missing)
	ls logs/hand/tiny/version_*/checkpoints/last.ckpt >/dev/null 2>&1 || $(MAKE) train-hand
	ls logs/outpaint/tiny/version_*/checkpoints/last.ckpt >/dev/null 2>&1 || $(MAKE) train-outpaint
	$(PY) -m experiments.run predict experiments/two_stage/tiny.yaml $(ARGS)

shards: install ## convert a dataset: DATASET=hagrid|interhand|reinterhand|laion_human|humanart|annotate SRC=... OUT=... [ARGS=...]
	@test -n "$(DATASET)" -a -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make shards DATASET=hagrid|interhand|reinterhand|laion_human|humanart|annotate SRC=DIR OUT=DIR [ARGS=...]"; exit 2; }
	@if [ "$(DATASET)" = annotate ]; then $(PY) -m datamodules.annotate --images $(SRC) --out $(OUT) $(ARGS); \
	else $(PY) -m datamodules.convert_$(DATASET) --src $(SRC) --out $(OUT) $(ARGS); fi

export: install ## export a trained UNet in diffusers format (CONFIG=..., ARGS="ckpt_path=... export_dir=...")
	$(PY) -m experiments.run export $(CONFIG) $(ARGS)

test: install ## fast tests (CPU, tiny models, synthetic shards)
	$(PY) -m pytest -q -k "not slow" $(ARGS)

test-full: install ## every test, slow ones included
	$(PY) -m pytest -q $(ARGS)

CONFIG_METHODS ?= experiments/eval/tiny.yaml
POSE ?= docs/examples/pose.json
PROMPT ?= a person waving, full body photo
METHODS ?= two_stage
sample: $(SYNTHETIC)/.done $(MALFORMED)/.done ## images from one pose (methods of CONFIG_METHODS): POSE=pose.json|PHOTO=img|SKELETON=img PROMPT="..." METHODS="two_stage humansd" (trains tiny methods if missing)
	$(PY) -m experiments.sample $(if $(PHOTO),--photo "$(PHOTO)",$(if $(SKELETON),--skeleton "$(SKELETON)",--pose "$(POSE)")) --prompt "$(PROMPT)" --methods $(METHODS) --config $(CONFIG_METHODS) $(ARGS)

refine: $(SYNTHETIC)/.done ## repair the hands of a folder of images with HandRefiner: IMAGES=dir PROMPT="..." [ARGS="--out dir --strength adaptive"] (trains the tiny refiner if missing)
	@test -n "$(IMAGES)" || { echo 'usage: make refine IMAGES=DIR PROMPT="..." [ARGS=...]'; exit 2; }
	$(PY) -m experiments.refine --images "$(IMAGES)" --prompt "$(PROMPT)" $(ARGS)

demo: $(SYNTHETIC)/.done $(MALFORMED)/.done ## local web demo: methods side by side from a pose (http://127.0.0.1:7860)
	$(PY) -m experiments.demo --config $(CONFIG_METHODS) $(ARGS)

bench-pose: install ## person/hand recall and attribution of the annotator on real photos (SAMPLES=../shared/real_samples)
	$(PY) -m benchmarks.pose_stack --samples $(or $(SAMPLES),../shared/real_samples) $(ARGS)

bench-loop: $(SYNTHETIC)/.done ## Lightning fit loop vs bare step, from pixels and from a latent cache (CPU, tiny hand generator)
	$(PY) -m benchmarks.train_loop $(ARGS)

TB_HOST ?= 127.0.0.1
tensorboard: install ## serve TensorBoard over logs/ on this machine (TB_HOST=0.0.0.0 to share it on the network)
	$(VENV)/bin/tensorboard --logdir logs --host $(TB_HOST)

lint: install ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: ## remove logs, results, exports, synthetic data and caches (keeps .venv)
	rm -rf logs data results exports .pytest_cache .ruff_cache

# CONFIG given on the command line picks the evaluation; otherwise the tiny one and its
# forgetting check (the hand fixes on prompts without hands)
EVAL_CONFIG = $(if $(filter command line,$(origin CONFIG)),$(CONFIG),experiments/eval/tiny.yaml experiments/eval/forgetting_tiny.yaml)

eval: $(SYNTHETIC)/.done $(MALFORMED)/.done ## every method on the same poses/prompts/seeds -> results/<name>/ table + TensorBoard (CONFIG=experiments/eval/<name>.yaml, ARGS=...)
	for config in $(EVAL_CONFIG); do $(PY) -m experiments.evaluate $$config $(ARGS) || exit 1; done

ablations: $(SYNTHETIC)/.done $(MALFORMED)/.done ## every config of experiments/ablations/ (trains the tiny variants if missing)
	for config in experiments/ablations/*.yaml; do $(PY) -m experiments.evaluate $$config $(ARGS) || exit 1; done

eval-metrics: $(SYNTHETIC)/.done ## score generated vs real images (CONFIG_EVAL=..., ARGS="key=value ...")
	$(PY) -m experiments.run eval $(CONFIG_EVAL) $(ARGS)
