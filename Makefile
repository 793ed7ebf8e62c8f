# LocCa Serve: every target sets up .venv itself (idempotent; quick once done).
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# every dependency pinned: pyproject.toml's pins with its dev and train extras, resolved by `make lock`
LOCK    ?= requirements/dev.lock

.PHONY: setup test serve lint lock examples clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv from the lock file and install the package in it (editable)

# a local wheel directory (PIP_FIND_LINKS: the CPU torch here) is offered to uv as pip would use it
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --quiet --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
# dev.lock: make setup; serve.lock: the CPU image's runtime (no torch); export-cpu.lock: the image's export stage
lock: $(STAMP)  ## resolve pyproject.toml's pins again into requirements/*.lock (uv): after changing a pin
	$(UV_COMPILE) --extra dev --extra train -o requirements/dev.lock
	$(UV_COMPILE) -o requirements/serve.lock
	$(UV_COMPILE) --extra train -o requirements/export-cpu.lock

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest -q

serve: $(STAMP)  ## serve the default model: REST :8000, gRPC :50051 (LOCCA_* variables apply; see service/README.md)
	$(BIN)/locca serve

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

MODEL ?= models/locca-tiny-shapes
examples: $(STAMP)  ## redraw docs/examples/ and the demo screenshot docs/demo.png with MODEL (needs chromium for the screenshot)
	$(BIN)/python docs/make_examples.py --model $(MODEL)

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .hypothesis

# ---- load test and container image (loadtests/, deploy/) --------------------------------------------------
LOCCA_URL            ?= http://127.0.0.1:8000
LOCCA_LOADTEST_TIME  ?= 30s
LOCCA_LOADTEST_USERS ?= 32
LOADTEST_OUT         := loadtests/results
IMAGE_TARGET         ?= cpu

.PHONY: loadtest image

loadtest: $(STAMP)  ## Locust against a running server (LOCCA_URL): CSV, HTML report, plot in loadtests/results/
	@$(BIN)/python -c "import locust" 2>/dev/null || $(BIN)/pip install --quiet -e ".[dev,train,bench]"
	@$(BIN)/python -c "import httpx; httpx.get('$(LOCCA_URL)/readyz', timeout=5).raise_for_status()" 2>/dev/null \
	  || { echo "no ready server at $(LOCCA_URL) (start one: make serve)"; exit 1; }
	@mkdir -p $(LOADTEST_OUT)
	@status=0; LOCCA_LOADTEST_OUT=$(LOADTEST_OUT) $(BIN)/locust -f loadtests/locustfile.py --headless --only-summary \
	    -H $(LOCCA_URL) -u $(LOCCA_LOADTEST_USERS) -t $(LOCCA_LOADTEST_TIME) --csv $(LOADTEST_OUT)/locust \
	    --csv-full-history --html $(LOADTEST_OUT)/report.html || status=$$?; \
	  $(BIN)/python loadtests/plot.py $(LOADTEST_OUT) && exit $$status

image:  ## build the container image (IMAGE_TARGET=cpu|gpu; deploy/build_image.sh, podman without a Docker engine)
	deploy/build_image.sh $(IMAGE_TARGET)

# ---- reliability: fuzzing and the soak (tests/test_service_fuzz.py, tests/test_service_hostile.py, loadtests/soak.py)
FUZZ_EXAMPLES ?= 1000
SOAK_TIME     ?= 600
SOAK_FACTOR   ?= 2
SOAK_QUEUE    ?= 32

.PHONY: fuzz soak

fuzz: $(STAMP)  ## longer fuzzing: hypothesis targets + schemathesis on the OpenAPI schema, FUZZ_EXAMPLES each
	LOCCA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/test_service_fuzz.py tests/test_service_hostile.py -k "fuzz or still_ready"

soak: $(STAMP)  ## SOAK_TIME s (600) of mixed load at SOAK_FACTOR x measured capacity, own server: loadtests/results/soak.*
	$(BIN)/python loadtests/soak.py --time $(SOAK_TIME) --factor $(SOAK_FACTOR) --queue $(SOAK_QUEUE)
