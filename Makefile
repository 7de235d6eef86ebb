# The README's two set-up commands: `make demo` and `make test`.
# Each creates/refreshes .venv, installs grcm with what it needs, then runs.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU wheel first so nothing pulls a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-one-thread lint bench bench-real clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/grcm demo

test: install
	$(BIN)/python -m pytest -q

# The tests whose results rest on float summation order, again at one thread: CI runs them under both
# settings (the whole suite passes with OMP_NUM_THREADS=1 too; this subset keeps CI short).
THREAD_SENSITIVE_TESTS = tests/test_synthetic.py tests/test_ddp.py tests/test_resume.py \
	tests/test_tokenizers_module.py tests/test_grdr.py tests/test_dual_tower_identity.py
test-one-thread: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q $(THREAD_SENSITIVE_TESTS)

lint: install
	$(BIN)/ruff check grcm tests benchmarks

bench: install
	$(BIN)/python benchmarks/decode_throughput.py --threads 1 --out benchmarks/results/decode_throughput.json
	$(BIN)/python benchmarks/sid_tokenizer.py --threads 1 --out benchmarks/results/sid_tokenizer.json
	test -f runs/demo/dual_tower/checkpoints/best.ckpt || $(BIN)/grcm demo  # efficiency.py reads the demo's towers
	$(BIN)/python benchmarks/efficiency.py --out benchmarks/results/efficiency.json --plot benchmarks/results/efficiency.png

# Real-language benchmark: the annotation files of MSVD and MSR-VTT under ANNOTATIONS/<dataset>/
# (downloads: docs/studies/real-language.md, "Annotations").
ANNOTATIONS ?= ../shared/data
bench-real: install
	$(BIN)/python benchmarks/real_language.py --annotation-dir $(ANNOTATIONS) --threads 1 --out benchmarks/results/real_language.json

clean:
	rm -rf runs benchmarks/results .pytest_cache .ruff_cache
