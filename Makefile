# The whole setup is two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo bench lock clean

install: $(STAMP)

# Reinstall only when the dependency list changes; `make install` is idempotent.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# accelerate launch pins CPU runs to 1 thread unless told otherwise: give the demo every core.
demo: install
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(shell nproc) job/train.py --config job/configs/demo.yaml

bench: install
	$(BIN)/python bench/data_throughput.py

# Exact versions for the container image, from a fresh venv of the runtime dependencies.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet .
	{ echo "# Exact versions for the container image (pip install --requirement). Regenerate after changing"; \
	  echo "# pyproject.toml: make lock (pip freeze of a fresh venv without the dev tools)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^cifar-transfer'; } > docker/requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
