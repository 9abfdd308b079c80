# Set-up is part of every target: the first `make run` or `make test` creates .venv and installs.
PYTHON ?= python3
VENV   := .venv
# The torch/torchvision pair is pinned here (not in pyproject) so users with another CUDA build can override it.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
SOURCE ?=
ARGS   ?=
# The review tools the tests start or read with (tests/test_review.py): a real Label Studio
# server and FiftyOne, each in a venv of its own (their pins are not ours).
REVIEW_TOOLS := .venv-labelstudio/.installed .venv-fiftyone/.installed

.PHONY: setup extras review-tools run test test-slow test-gpu clean

# What running needs, and nothing more: an optional runtime installed here would be weighed
# by --runtime auto, so the test extras (OpenVINO, Ray, Keras, ...) come only with `make test`.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(REVIEW_TOOLS)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

review-tools: $(REVIEW_TOOLS)

.venv-labelstudio/.installed:
	$(PYTHON) -m venv .venv-labelstudio
	.venv-labelstudio/bin/pip install --quiet 'label-studio==1.23.2'
	touch $@

.venv-fiftyone/.installed:
	$(PYTHON) -m venv .venv-fiftyone
	.venv-fiftyone/bin/pip install --quiet 'fiftyone==1.22.1'
	touch $@

# Optional parts, kept as an editable install of this checkout: make extras EXTRAS=openvino,s3
extras: setup
	@test -n "$(EXTRAS)" || { echo 'usage: make extras EXTRAS=openvino[,s3,ray,timm,keras,delta,iceberg]' >&2; exit 2; }
	$(VENV)/bin/pip install --quiet -e '.[$(EXTRAS)]'

run: setup
	@test -n "$(SOURCE)" || { echo 'usage: make run SOURCE=path/to/images [ARGS="--out DIR ..."]' >&2; exit 2; }
	$(VENV)/bin/label-images run "$(SOURCE)" $(ARGS)

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest

# Also reads the output with Spark (pyspark brings Spark itself; it needs Java on the PATH).
test-slow: $(VENV)/.installed-test
	$(VENV)/bin/pip install --quiet 'pyspark==3.5.*'
	$(VENV)/bin/python -m pytest -m slow

# On a machine with CUDA: the tests that need a GPU (they skip elsewhere).
test-gpu: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -m gpu

clean:
	rm -rf $(VENV) .venv-labelstudio .venv-fiftyone .pytest_cache
