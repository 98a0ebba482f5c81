# The two commands of the README. Both do all set-up on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test bench bench-gpu

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/omnimamba quickstart

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/backbone_cpu.py

# On a CUDA machine with the gpu and bench extras installed: GPU tests, the three GPU benchmarks, the report.
bench-gpu: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash benchmarks/run_gpu.sh
