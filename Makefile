# Set-up and everyday commands. The first run of any target creates .venv and installs
# the project into it, every package at its version in constraints.txt (the image installs
# with the same file); torch is named here (see README "GPU" for the CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
FMNIST ?= /usr/share/datasets/fashion-mnist
MNIST ?= ../shared/data/mnist

.PHONY: serve test bench check-image train-fashion-mnist train-mnist export-fashion-mnist export-mnist gpu-data \
	train-fashion-mnist-classes train-mnist-classes export-fashion-mnist-classes export-mnist-classes \
	photos-data train-photos export-photos

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[train,test]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/python -m service

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python -m bench.model_throughput

# The image built and run for real: compose up, scoring, SIGTERM drain, 3 replicas behind
# HAProxy (deploy/check-image.sh; as root: installs and starts Docker where missing; no venv
# needed). See deploy/README.md for its duration and when it last passed.
check-image:
	bash deploy/check-image.sh

# Reproduce the shipped checkpoints' runs from scratch in their two recorded phases (the model
# cards list every command). 1: Adam 1e-3, 500 warm-up steps, constant until --decay-start, then
# a cosine to 5% at --max-steps, stopped at --stop-at (the session that ran it ended there).
# 2: a warm restart from that step, a cosine from 3e-4 to 5% of it. RESUME=1 runs phase 2 only,
# continuing the run folder exactly. A rerun matches the recorded settings, not the floats bit for
# bit: the shipped runs' early steps computed the coupling's log-scale as log(sigmoid) (now
# logsigmoid), and phase 2 ran its first ~2,400 steps under --max-steps 78504 then 64504 (MNIST:
# 78065 then 64065) before the final one (learning rates within 3% of this schedule's).
FMNIST_RUN = --train $(FMNIST)/train-images-idx3-ubyte.gz --dataset-name fashion-mnist \
	--output runs/fashion-mnist --steps 16 --hidden 64 --threads 1
MNIST_RUN = --train $(MNIST)/train-images-idx3-ubyte.recon.gz --dataset-name mnist \
	--output runs/mnist --steps 16 --hidden 64 --threads 1

train-fashion-mnist: $(BIN)/.installed
	$(if $(RESUME),,$(BIN)/python -m model.train $(FMNIST_RUN) \
		--schedule cosine --decay-start 22584 --max-steps 50584 --stop-at 46504)
	$(BIN)/python -m model.train $(FMNIST_RUN) --resume --schedule cosine --lr 3e-4 --decay-start 46504 --max-steps 72504

train-mnist: $(BIN)/.installed
	$(if $(RESUME),,$(BIN)/python -m model.train $(MNIST_RUN) \
		--schedule cosine --decay-start 22385 --max-steps 50385 --stop-at 46065)
	$(BIN)/python -m model.train $(MNIST_RUN) --resume --schedule cosine --lr 3e-4 --decay-start 46065 --max-steps 72065

# The class-conditional checkpoints: the shipped flows made conditional (--init-from: each class's top
# Gaussian fitted in closed form), then fine-tuned on p(x | label) at 1e-4 for 900 steps (a cosine after 200 warm-up steps).
FMNIST_LABELS = T-shirt/top Trouser Pullover Dress Coat Sandal Shirt Sneaker Bag "Ankle boot"
CLASSES_RUN = --conditional --lr 1e-4 --warmup-steps 200 --schedule cosine --max-steps 900 --threads 1

train-fashion-mnist-classes: $(BIN)/.installed
	$(BIN)/python -m model.train --train $(FMNIST)/train-images-idx3-ubyte.gz --dataset-name fashion-mnist \
		--output runs/fashion-mnist-classes --init-from weights/fashion-mnist --label-names $(FMNIST_LABELS) \
		$(CLASSES_RUN) $(if $(RESUME),--resume)

train-mnist-classes: $(BIN)/.installed
	$(BIN)/python -m model.train --train $(MNIST)/train-images-idx3-ubyte.recon.gz \
		--train-labels $(MNIST)/train-labels-idx1-ubyte.gz --dataset-name mnist --output runs/mnist-classes \
		--init-from weights/mnist $(CLASSES_RUN) $(if $(RESUME),--resume)

export-fashion-mnist-classes: $(BIN)/.installed
	$(BIN)/python -m model.export --run runs/fashion-mnist-classes --test $(FMNIST)/t10k-images-idx3-ubyte.gz \
		--output weights/fashion-mnist-classes --name glow-fashion-mnist-classes

export-mnist-classes: $(BIN)/.installed
	$(BIN)/python -m model.export --run runs/mnist-classes --test $(MNIST)/t10k-images-idx3-ubyte.gz \
		--output weights/mnist-classes --name glow-mnist-classes

export-fashion-mnist: $(BIN)/.installed
	$(BIN)/python -m model.export --run runs/fashion-mnist --train $(FMNIST)/train-images-idx3-ubyte.gz \
		--test $(FMNIST)/t10k-images-idx3-ubyte.gz --output weights/fashion-mnist

export-mnist: $(BIN)/.installed
	$(BIN)/python -m model.export --run runs/mnist --train $(MNIST)/train-images-idx3-ubyte.recon.gz \
		--test $(MNIST)/t10k-images-idx3-ubyte.gz --output weights/mnist

# The RGB checkpoint: 32x32 patches cut from the photographs scikit-image and scikit-learn ship
# (python -m model.photos, in data/photos, ignored by git), 3 levels x 8 steps, width 64, a cosine
# from 1e-3 over 2,000 steps (its card: weights/photos/README.md).
photos-data: $(BIN)/.installed
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[photos]'
	$(BIN)/python -m model.photos --output data/photos

train-photos: $(BIN)/.installed
	$(BIN)/python -m model.train --train data/photos/train.npz --dataset-name photos --output runs/photos \
		--steps 8 --threads 1 --schedule cosine --warmup-steps 200 --max-steps 2000 $(if $(RESUME),--resume)

export-photos: $(BIN)/.installed
	$(BIN)/python -m model.export --run runs/photos --test data/photos/test.npz --output weights/photos \
		--name glow-photos

# The data deploy/gpu-train.sh reads, in .gpu-data/ (ignored by git; carried to a GPU machine).
gpu-data:
	mkdir -p .gpu-data/fashion-mnist .gpu-data/mnist
	cp $(FMNIST)/*-idx?-ubyte.gz .gpu-data/fashion-mnist/
	cp $(MNIST)/*-idx?-ubyte*.gz .gpu-data/mnist/
