# Two commands set everything up on a fresh machine:
#   make run    install into .venv and train the example GPT on a local Ray instance
#   make test   install into .venv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/stalwart run examples/tiny_gpt/job.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

clean:
	rm -rf $(VENV)
