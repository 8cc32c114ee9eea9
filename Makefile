PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
VPIP := $(VENV)/bin/pip

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPIP) install torch==2.14.1 torchvision==0.29.1
	$(VPIP) install -e ".[examples,dev,onnx]"
	touch $@

demo: venv
	$(VPY) scripts/demo.py

test: venv
	$(VPY) -m pytest -q tests

clean:
	rm -rf .pytest_cache build *.egg-info
