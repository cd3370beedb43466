# Two commands a new user needs: `make demo PROMPT="..."` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= a lighthouse at dusk
# The demo's model and device (atelier demo --model / --device). tiny-sdxl needs no hub;
# on a CUDA machine with hub access: make demo MODEL=playground-v2.5
MODEL ?= tiny-sdxl
DEVICE ?=
# torch is pinned here (the CPU build this machine serves from disk); pyproject keeps a
# loose range so GPU hosts choose their own CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo studio test lint docs typecheck install prereqs clean bench bench-gpu

$(BIN)/atelier: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[worker,dev]"
	touch $@

install: $(BIN)/atelier

demo: install
	$(BIN)/atelier demo "$(PROMPT)" --model "$(MODEL)" $(if $(DEVICE),--device "$(DEVICE)")

# The studio page on the same embedded stack plus the API; prints its address with a key.
studio: install
	$(BIN)/atelier studio --model "$(MODEL)" $(if $(DEVICE),--device "$(DEVICE)") $(if $(PORT),--port "$(PORT)")

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy producer worker tests bench
	$(BIN)/lint-imports

# The docs site (mkdocs.yml, docs/): strict, so a broken link fails. Built outside the tree.
# (No -q: mkdocs then stops counting warnings, and strict lets a broken link through.)
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(or $(TMPDIR),/tmp)/atelier-site

# The openai npm package tests/test_openai.py drives through node (skipped only where
# node is absent).
NODE_DEPS := tests/node/node_modules/.package-lock.json
$(NODE_DEPS): tests/node/package-lock.json | prereqs
	@if command -v npm >/dev/null 2>&1; then cd tests/node && npm ci --no-audit --no-fund; \
	else echo "npm not found: tests/test_openai.py skips its node case"; fi

# What the tests need from the system (redis-server, chromium, node/npm, docker-compose),
# installed with apt-get where missing, or the one command to run printed.
prereqs:
	@PYTHON="$(PYTHON)" VENV="$(VENV)" scripts/prereqs.sh

# Two pytest processes, one test module each at a time (--dist loadfile keeps a module's
# fixtures in one process): much of the suite waits on leases and timeouts at the
# settings users have, and the other process uses that time.
test: prereqs lint docs $(NODE_DEPS)
	$(BIN)/pytest -q -n 2 --dist loadfile

# The unit tests alone, for the edit-test loop: nothing `slow` (a worker subprocess, the
# tiny models), no fault suite (`faults`), no lint or docs; `make test` is still the bar
# before a merge. One process: two xdist workers each import torch to collect, which cost
# more than they saved on two busy cores.
.PHONY: test-fast
test-fast: install
	$(BIN)/pytest -q -m "not slow and not faults"

# The CPU benchmarks (each under 3 minutes; the last line of each is its JSON result).
bench: install
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/duty_cycle.py
	$(BIN)/python bench/pipeline_efficiency.py
	$(BIN)/python bench/recovery.py
	$(BIN)/python bench/sse_fanout.py
	$(BIN)/python bench/list_jobs.py
	$(BIN)/python bench/conditioning.py

# On a CUDA machine with the model's weights at hand (or hub access).
bench-gpu: install
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(VENV) atelier-output .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache
