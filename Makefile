# Two commands on a fresh machine (README):  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test
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
