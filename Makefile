PYTHON ?= python3

.PHONY: run test setup

run: setup            ## the embedded SmolLM2-135M-Instruct answers a question
	$(PYTHON) generate.py

test: setup           ## the test suite (CPU; CUDA tests run only where a GPU is present)
	$(PYTHON) -m pytest -q tests

setup:
	PYTHON=$(PYTHON) bash setup.sh
