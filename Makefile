# The two commands a new machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-peft test-oldest bench bench-gpu install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build on this machine's disk meets the package's torch>=2.6
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# pyreft 0.1.0 pins transformers 4.45 and pulls wandb etc.: its intervention modules need none of it
	$(BIN)/pip install -q --no-deps pyreft==0.1.0 pyvene==0.1.8
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Fast suite for CI; pytest's exit 5 (no tests collected) is not a failure of ours to hide, so it fails too.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=20

test-all: $(STAMP)
	$(BIN)/python -m pytest

# PEFT's own torch.compile suite, offline (slow; docs/peft-suite.md). FXLORA_PEFT_SUITE_INNER=inductor for Inductor.
test-peft: $(STAMP)
	$(BIN)/python -m pytest tests/peft_suite -m slow

# The oldest releases pyproject claims (constraints-oldest.txt), in their own venv; TRL's tests skip there.
OLDEST := .venv-oldest
$(OLDEST)/.installed: pyproject.toml constraints-oldest.txt
	test -d $(OLDEST) || $(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q torch==2.13.0
	$(OLDEST)/bin/pip install -q -e ".[test,hf]" -c constraints-oldest.txt
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m fxlora.bench $(BENCH_ARGS)

# One GPU: bf16, a Llama-shaped model of ~0.5B parameters (h2048, 8 layers, seq 4096, batch 1),
# LoRA r16 on all linears, dropout 0 and 0.05; floor / peft-eager / peft-inductor / fxlora
# interleaved, with one profiled step each. Writes benchmarks/lora_gpu_<date>.{md,json,csv},
# its plot and profiles (docs/results.md). Then the GPU tests: pytest -m gpu.
GPU_BENCH := --device cuda --dtype bf16 --hidden 2048 --intermediate 5632 --layers 8 --heads 16 --vocab 32000 \
	--batch 1 --seqs 4096 --ranks 16 --dropouts 0,0.05 --steps 7 --warmup 2 --profile
bench-gpu: $(STAMP)
	$(BIN)/python -m fxlora.bench $(GPU_BENCH) --tag gpu_$$(date +%Y%m%d) --plot benchmarks/lora_gpu.png $(BENCH_ARGS)
	$(BIN)/python -m pytest -m gpu -q

clean:
	rm -rf $(VENV) $(OLDEST) *.egg-info .pytest_cache build
