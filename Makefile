# Set-up and everyday commands. The first run of any target creates .venv and installs
# the project into it; torch is pinned here (see README "GPU" for the CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
FMNIST ?= /usr/share/datasets/fashion-mnist
MNIST ?= ../shared/data/mnist

.PHONY: serve test bench train-fashion-mnist train-mnist export-fashion-mnist export-mnist

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[train,test]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/python -m service

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python -m bench.model_throughput

# Reproduce the shipped checkpoints' runs from scratch, in one run: the schedule their model
# cards record (Adam 1e-3, 500 warm-up steps, constant until --decay-start, then cosine to 5% at
# --max-steps). The shipped runs were resumed several times, and their early steps computed the
# coupling's log-scale as log(sigmoid) (now logsigmoid): a rerun matches their settings, not
# their floats bit for bit.
train-fashion-mnist: $(BIN)/.installed
	$(BIN)/python -m model.train --train $(FMNIST)/train-images-idx3-ubyte.gz --dataset-name fashion-mnist \
		--output runs/fashion-mnist --steps 16 --hidden 64 --threads 1 \
		--schedule cosine --decay-start 22584 --max-steps 50584 $(RESUME)

train-mnist: $(BIN)/.installed
	$(BIN)/python -m model.train --train $(MNIST)/train-images-idx3-ubyte.recon.gz --dataset-name mnist \
		--output runs/mnist --steps 16 --hidden 64 --threads 1 \
		--schedule cosine --decay-start 22385 --max-steps 50385 $(RESUME)

export-fashion-mnist: $(BIN)/.installed
	$(BIN)/python -m model.export --run runs/fashion-mnist --train $(FMNIST)/train-images-idx3-ubyte.gz \
		--test $(FMNIST)/t10k-images-idx3-ubyte.gz --output weights/fashion-mnist

export-mnist: $(BIN)/.installed
	$(BIN)/python -m model.export --run runs/mnist --train $(MNIST)/train-images-idx3-ubyte.recon.gz \
		--test $(MNIST)/t10k-images-idx3-ubyte.gz --output weights/mnist
