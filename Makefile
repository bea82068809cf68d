VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: test demo venv

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(VENV)/bin/activate

test: venv
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pytest -x -q

demo: venv
	$(PY) -m pip install -q -e .
	$(VENV)/bin/jax-repvideo generate configs/tiny_fifo.yaml
