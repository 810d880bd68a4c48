# The two quick-start commands: `make run` and `make test`. Both set up
# everything they need on a fresh machine (a .venv, the project, the
# Fashion-MNIST files and the default generator's weights).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,diffusion]'
	# The default FedKTL generator's weights ship in this package; its declared
	# dependencies (wandb, ...) are not needed to read them.
	$(BIN)/pip install -q --no-deps gan_face_generate==1.1.1 omniart-eye-generator==0.1
	touch $@

$(FMNIST):
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

setup: $(VENV)/.installed
data: $(FMNIST)

run: setup data
	$(BIN)/htfl run --algo fedktl

test: setup data
	$(BIN)/ruff check htfl_plugins fedktl_plugin baselines tests benchmarks
	$(BIN)/python -m pytest -q

# The FedKTL table of docs/fedktl.md and benchmarks/RESULTS.md: runs the suite
# (skipping finished cells) and writes the tables and figures.
BENCH := benchmarks/results/fedktl-ablations
bench: setup data
	$(BIN)/htfl bench benchmarks/suites/fedktl-ablations.toml --out benchmarks/results --jobs 2
	$(BIN)/htfl compare $(BENCH) --table pivot -o benchmarks/fedktl-ablations.md \
	  --plot benchmarks/fedktl-curves.png --plot-upload benchmarks/fedktl-acc-vs-upload.png
	$(BIN)/htfl compare $(BENCH) -o benchmarks/fedktl-ablations-summary.md
	$(BIN)/htfl compare $(BENCH) --table traffic -o benchmarks/fedktl-traffic.md
	$(BIN)/htfl compare $(BENCH) --table time -o benchmarks/fedktl-time.md

lint: setup
	$(BIN)/ruff check htfl_plugins fedktl_plugin baselines tests

clean:
	rm -rf $(VENV) *.egg-info
