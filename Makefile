# The two commands a fresh machine needs: `make book` and `make test`.
# Each creates .venv if it is missing and installs dpo_lit with its dev extras.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch this machine carries; an unpinned torch would pull GBs of CUDA wheels.
TORCH_PIN := torch==2.13.0
BOOK_FLAGS := -W -n --keep-going
export PYTHONHASHSEED := 0

.PHONY: help venv export clean-nbs sync nbtest pytest book browser test test-slow bench gpu-check clean

help:
	@echo "make book   execute every notebook and render the book to _build/html"
	@echo "make test   sync check, notebook tests, pytest, strict book build, browser check"
	@echo "make gpu-check   every GPU path, where CUDA exists (no venv needed)"

$(STAMP): setup.py settings.ini pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

venv: $(STAMP)

export: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

# 1. The library is what the notebooks export, and the notebooks are clean:
#    running nbdev_export and nbdev_clean must change nothing.
sync: $(STAMP)
	@snap() { find nbs dpo_lit settings.ini -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha1sum; }; \
	before=$$(snap); $(BIN)/nbdev_export; $(BIN)/nbdev_clean; after=$$(snap); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev_export / nbdev_clean changed these files: run 'make export' and commit:"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^>' | awk '{print "  " $$3}'; exit 1; \
	fi; echo "sync: library and notebooks are in step"

# 2. Every notebook as a test, skipping cells flagged slow or gpu (tst_flags in settings.ini).
#    PyTorch picks its CPU kernels at run time (AVX-512, AVX2 or plain), and two code paths that
#    agree to the bit with one set can differ in the last bits with another. The book build (step 4)
#    executes every notebook with this machine's own kernels and default threads; here they run
#    again with the plain kernels and one thread, and with AVX2 where the machine has AVX-512, so a
#    check that only holds on one kind of CPU fails here and not on someone else's machine.
KERNEL_SETS := default $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo avx2)
nbtest: $(STAMP)
	@for cap in $(KERNEL_SETS); do \
	  threads=$$([ "$$cap" = default ] && echo 1 || echo 2); \
	  echo "== notebooks with ATEN_CPU_CAPABILITY=$$cap, $$threads thread(s)"; \
	  ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$threads \
	    $(BIN)/nbdev_test --n_workers 2 --timing; \
	done

# 3. The pytest suites (all but the browser check, which needs the built book), then the suites
#    that compare two code paths (chunked/fused/naive, live/precomputed reference, accumulation,
#    TRL parity) once more with the plain kernels and one thread.
PATH_TESTS := tests/test_logprobs.py tests/test_losses.py tests/test_train.py \
              tests/test_precompute.py tests/test_data.py
pytest: $(STAMP)
	$(BIN)/python -m pytest tests -m "not browser" -q
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 \
	  $(BIN)/python -m pytest $(PATH_TESTS) -m "not browser and not slow" -q -p no:cacheprovider

# 4. The book: every notebook executed, warnings are errors, execution errors are fatal.
book: $(STAMP)
	$(BIN)/jupyter-book build . $(BOOK_FLAGS)
	@echo "book: open _build/html/index.html"

# 5. Every built page in headless Chromium, offline; screenshots in _build/screenshots/.
browser: $(STAMP)
	$(BIN)/python -m pytest tests -m browser -q

test: $(STAMP)
	@start=$$(date +%s); \
	for step in sync nbtest pytest book browser; do \
	  t0=$$(date +%s); $(MAKE) --no-print-directory $$step; \
	  echo "== $$step took $$(( $$(date +%s) - t0 )) s"; \
	done; echo "== make test took $$(( $$(date +%s) - start )) s"

# Cells flagged slow too (minutes); gpu cells need CUDA: `make test-slow FLAGS="slow gpu"`.
FLAGS ?= slow
test-slow: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --flags "$(FLAGS)"

bench: $(STAMP)
	$(BIN)/python -m dpo_lit.bench

# Every GPU path on this machine's CUDA GPU(s): the gpu cells, the GPU benchmark, DDP and FSDP,
# bf16 and fp16 training. Needs no venv (the system python3 with torch and transformers is
# enough). Without CUDA it says so and exits 0.
gpu-check:
	PYTHONPATH=$(CURDIR) python3 -m dpo_lit.gpu_check --out nbs/bench_results/gpu-check/$$(date +%F).json

clean:
	rm -rf _build dist build *.egg-info
