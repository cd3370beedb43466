# Two commands a new user needs: `make demo PROMPT="..."` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= a lighthouse at dusk
# torch is pinned here (the CPU build this machine serves from disk); pyproject keeps a
# loose range so GPU hosts choose their own CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test lint typecheck install clean bench bench-gpu

$(BIN)/atelier: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[worker,dev]"
	touch $@

install: $(BIN)/atelier

demo: install
	$(BIN)/atelier demo "$(PROMPT)"

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy producer worker

test: lint
	$(BIN)/pytest -q

# The CPU benchmarks (each under 3 minutes; the last line of each is its JSON result).
bench: install
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/duty_cycle.py
	$(BIN)/python bench/pipeline_efficiency.py
	$(BIN)/python bench/recovery.py

# On a CUDA machine with the model's weights at hand (or hub access).
bench-gpu: install
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(VENV) atelier-output .pytest_cache .mypy_cache .ruff_cache
