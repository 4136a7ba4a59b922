# Two entry points (see README): `make demo` and `make test`. Both create .venv and install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint test bench clean

$(STAMP): requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# tensorflow_hub imports tf_keras; its `tensorflow` requirement is met by tensorflow-cpu.
	$(BIN)/pip install -q --no-deps tf-keras==2.21.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/toy_demo.py --workdir runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -n 2 -q --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/likelihood.py
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/loops.py
	$(BIN)/python benchmarks/memory.py timing
	$(BIN)/python benchmarks/memory.py measure --jobs 2
	$(BIN)/python benchmarks/memory.py doc --results runs/bench/memory_cifar10.csv \
	  | tee runs/bench/memory.md

clean:
	rm -rf $(VENV) runs
