# The two quick-start commands: `make run` and `make test`. Both set up
# everything they need on a fresh machine (a .venv, the project, the
# Fashion-MNIST files and the default generator's weights).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PDFLATEX := /usr/bin/pdflatex
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins every package's version, so that results reproduce.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,diffusion,ray]'
	# The default FedKTL generator's weights ship in this package; its declared
	# dependencies (wandb, ...) are not needed to read them.
	$(BIN)/pip install -q --no-deps -c constraints.txt gan_face_generate==1.1.1 omniart-eye-generator==0.1
	touch $@

$(FMNIST):
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

# A TeX engine, for the test that compiles a LaTeX table (30 s to install).
$(PDFLATEX):
	$(SUDO) apt-get install -y -q --no-install-recommends texlive-latex-base || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends texlive-latex-base; }

setup: $(VENV)/.installed
data: $(FMNIST)

run: setup data
	$(BIN)/htfl run --algo fedktl

test: setup data lint $(PDFLATEX)
	$(BIN)/python -m pytest -q

# benchmarks/RESULTS.md: runs the suites (skipping finished cells) and writes the
# tables and figures it shows into benchmarks/tables/.
R := benchmarks/results
T := benchmarks/tables
bench: setup data
	$(BIN)/htfl bench benchmarks/suites/fedktl-ablations.toml --out $(R) --jobs 2
	$(BIN)/htfl bench benchmarks/suites/fedktl-centroids.toml --out $(R) --jobs 2
	$(BIN)/htfl bench benchmarks/suites/cpu-ktl-single.toml --out $(R) --jobs 2
	mkdir -p $(T)
	$(BIN)/htfl compare $(R)/fedktl-ablations $(R)/fedktl-centroids -o $(T)/fedktl-fmnist.md \
	  --plot $(T)/fedktl-fmnist-curves.png --plot-upload $(T)/fedktl-fmnist-acc-vs-upload.png
	$(BIN)/htfl compare $(R)/fedktl-ablations $(R)/fedktl-centroids --table traffic -o $(T)/fedktl-fmnist-traffic.md
	$(BIN)/htfl compare $(R)/fedktl-ablations $(R)/fedktl-centroids --table time -o $(T)/fedktl-fmnist-time.md
	$(BIN)/htfl compare $(R)/cpu-ktl-single --table pivot -o $(T)/ktl-single.md
	$(BIN)/htfl bench benchmarks/suites/baselines-fmnist.toml --out $(R) --jobs 2
	$(BIN)/htfl compare $(R)/baselines-fmnist -o $(T)/baselines-fmnist.md
	$(BIN)/htfl compare $(R)/baselines-fmnist --table rounds --at 1,2,5,10,20,50 -o $(T)/baselines-fmnist-rounds.md
	$(BIN)/htfl compare $(R)/baselines-fmnist --table time -o $(T)/baselines-fmnist-time.md
	$(BIN)/htfl compare $(R)/baselines-fmnist --plot $(T)/baselines-fmnist-curves.png
	$(BIN)/htfl bench benchmarks/suites/cpu-table1.toml --out $(R) --jobs 2
	$(BIN)/htfl bench benchmarks/suites/cpu-table1-fmnist.toml --out $(R) --jobs 2
	$(BIN)/htfl compare $(R)/cpu-table1 $(R)/cpu-table1-fmnist $(R)/baselines-fmnist --table pivot -o $(T)/cpu-table1.md
	$(BIN)/htfl compare $(R)/cpu-table1 $(R)/cpu-table1-fmnist $(R)/baselines-fmnist --table pivot --metric last_acc \
	  -o $(T)/cpu-table1-last.md
	$(BIN)/htfl compare $(R)/cpu-table1 $(R)/cpu-table1-fmnist --table time -o $(T)/cpu-table1-time.md
	$(BIN)/htfl compare $(R)/cpu-table1 $(R)/cpu-table1-fmnist $(R)/baselines-fmnist --table traffic \
	  -o $(T)/cpu-table1-traffic.md
	$(BIN)/htfl compare $(R)/cpu-table1/*digits_partition=dir* --plot $(T)/cpu-table1-digits-dir-curves.png \
	  --plot-upload $(T)/cpu-table1-digits-dir-acc-vs-upload.png
	$(BIN)/htfl compare $(R)/cpu-table1 --plot docs/img/cpu-table1-digits.png
	$(BIN)/htfl bench benchmarks/suites/cpu-models.toml --out $(R) --jobs 2
	$(BIN)/htfl compare $(R)/cpu-models $(R)/cpu-table1/*digits_partition=dir* --table pivot -o $(T)/cpu-models.md
	$(BIN)/htfl compare $(R)/cpu-models $(R)/cpu-table1/*digits_partition=dir* --table pivot --metric last_acc \
	  -o $(T)/cpu-models-last.md
	$(BIN)/htfl compare $(R)/cpu-models $(R)/cpu-table1/*digits_partition=dir* --table time -o $(T)/cpu-models-time.md
	$(BIN)/htfl bench benchmarks/suites/cpu-clients.toml --out $(R) --jobs 2
	$(BIN)/htfl compare $(R)/cpu-clients --table pivot -o $(T)/cpu-clients.md
	$(BIN)/htfl compare $(R)/cpu-clients --table pivot --metric last_acc -o $(T)/cpu-clients-last.md
	$(BIN)/htfl compare $(R)/cpu-clients --table time -o $(T)/cpu-clients-time.md
	$(BIN)/htfl compare $(R)/cpu-clients/*clients=50_* -o $(T)/cpu-clients-summary.md
	$(BIN)/htfl bench benchmarks/suites/fedktl-default-ablations.toml --out $(R) --jobs 2
	$(BIN)/htfl compare $(R)/baselines-fmnist/Local_* $(R)/baselines-fmnist/FedKTL_monotone_* \
	  $(R)/fedktl-default-ablations --rounds 20 -o $(T)/fedktl-default-ablations.md

lint: setup
	$(BIN)/ruff check htfl_plugins fedktl_plugin baselines tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info
