# Two commands on a fresh machine (README):  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-torch24
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt $(wildcard csrc/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[cpu,test]"
	# Native kernels (fastfair._C): compiled against the torch just installed, hence no build isolation.
	FASTFAIR_BUILD_NATIVE=1 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(BIN)/python -m fastfair.demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

# The suite on the oldest supported torch (2.4) and the newest libraries that run on it (constraints-torch2.4.txt;
# a ~5 GB venv: PyPI's torch 2.4.1 is a CUDA build). No native build here: the native tests JIT-compile csrc/.
VENV24 ?= .venv-torch24
test-torch24:
	test -x $(VENV24)/bin/python || $(PY) -m venv $(VENV24)
	$(VENV24)/bin/python -m pip install -q -c constraints-torch2.4.txt -e ".[train,test]"
	$(VENV24)/bin/python -m pytest -q $(ARGS)
