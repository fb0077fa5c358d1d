# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned to the versions available on the CI disk
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# Passive OpenMP waits: on a shared 2-core machine spinning threads slowed training 5x (measured).
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/cascade-rcnn demo --out demo_output

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

clean:
	rm -rf $(VENV) demo_output
