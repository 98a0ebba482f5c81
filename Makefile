# The two commands of the README. Both do all set-up on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test bench

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/omnimamba quickstart

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/backbone_cpu.py
