# neuroexplain — `make serve` starts the service with its defaults, `make test` runs the tests.
# Both create the virtual environment at .venv and install the project into it on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is installed first and pinned, so that no dependency pulls a CUDA build.
# The GPU image sets TORCH_SPEC/TORCH_INDEX to the CUDA build of the same release (see Dockerfile).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# What `install` puts in the venv. The image (Dockerfile) installs EXTRAS=full EDITABLE= : runtime only, not editable.
EXTRAS ?= dev
EDITABLE ?= -e
# Where `make models` writes the archives (serve's --model-store default; the image uses its own path).
MODEL_STORE ?= model_store

.PHONY: install models serve test bench fuzz gpu-wheels lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet $(EDITABLE) ".[$(EXTRAS)]"
	touch $@

# gRPC stubs are generated from proto/ (never committed): by the install's build hook (setup.py) and again here
# whenever the .proto changes. Without grpcio-tools (runtime-only image) the installed stubs must import.
PROTO_STUBS := neuroexplain/_proto/neuroexplain_pb2.py
$(PROTO_STUBS): proto/neuroexplain/v1/neuroexplain.proto $(BIN)/.installed
	if $(BIN)/python -c "import grpc_tools" 2>/dev/null; then \
		$(BIN)/python -c "import runpy; runpy.run_path('setup.py', run_name='neuroexplain_stubs')"; \
	else $(BIN)/python -c "import neuroexplain._proto.neuroexplain_pb2"; fi

# TorchServe's gRPC client, generated from the protos inside the installed torchserve package (never committed).
TS_STUBS := service/gen/torchserve/inference_pb2_grpc.py
$(TS_STUBS): $(BIN)/.installed
	$(BIN)/python -m service.backends.torchserve_proto

install: $(BIN)/.installed $(PROTO_STUBS) $(TS_STUBS)

# One TorchServe archive (.mar) per bundled model in $(MODEL_STORE), rebuilt only when stale. Building needs no Java;
# serving with TorchServe does, so a missing Java is reported here before `make serve` starts.
models: install
	@command -v java >/dev/null 2>&1 || [ -x "$$JAVA_HOME/bin/java" ] || echo "warning: Java 17 not found; the TorchServe backend (the default of make serve) needs it: install openjdk-17-jre-headless or set JAVA_HOME, or run .venv/bin/neuroexplain serve --backend inprocess" >&2
	$(BIN)/python -m handlers.archive $(MODEL_STORE)

serve: models
	$(BIN)/neuroexplain serve $(SERVE_ARGS)

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python -m bench

# The long fuzz run (>= 10,000 seeded malformed scans through a real gateway on both backends; ~25 min on 2 cores):
# counts per status code, hangs, worker deaths, peak RSS per process. `make test` runs a short one (tests/fuzz).
# FUZZ_ARGS: e.g. --cases inprocess=4000,torchserve=6000 --seed 1 --save-failures
FUZZ_ARGS ?=
fuzz: install
	$(BIN)/python tests/fuzz/run.py $(FUZZ_ARGS)

# The pure-Python wheels bench/gpu.sh carries to the GPU machine (into the ignored bench/wheels/; needs PyPI here).
gpu-wheels: install
	PYTHON=$(BIN)/python bench/gpu.sh --download-wheels

lint: install
	$(BIN)/ruff check neuroexplain service handlers tests bench
	$(BIN)/mypy neuroexplain service handlers

clean:
	rm -rf $(VENV) build *.egg-info
