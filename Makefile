# Every target that needs Python first brings .venv up to date, so `make run` and `make test` work as the very first
# command on a fresh machine. PYTHON picks the interpreter that builds the venv (3.11 or newer).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO_OUT := client/lstm_client/_proto
# The protobuf generator lives in a venv of its own: it is pinned older than .venv's protobuf (requirements-proto.txt).
PROTO_VENV  := .venv-proto
PROTO_STAMP := $(PROTO_VENV)/.installed
OIP_OUT   := server/lstm_serve/_proto
# tritonclient, in a venv of its own (it needs protobuf < 7): the tests drive the OIP endpoint with it
TRITON_VENV  := .venv-tritonclient
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: help venv tritonclient-venv run test docker-test lint proto proto-check client-compat bench clean fuzz-long

help:
	@echo "make run     serve the bundled models on 127.0.0.1:50051 (metrics on :9464); sessions kept across restarts"
	@echo "make test    run the whole test suite"
	@echo "make docker-test  build the image and bring up docker-compose.yml for real (part of make test; needs root or an engine)"
	@echo "make lint    ruff + mypy + generated-code check + buf lint/format/breaking of proto/"
	@echo "make client-compat  lstm-client's tests in fresh venvs with the oldest and newest protobuf/grpcio/numpy"
	@echo "make proto   regenerate the protobuf/gRPC code from proto/"
	@echo "make bench   measure lstm-serve against a bare gRPC echo on loopback (takes minutes)"
	@echo "make fuzz-long  tests/fuzz with FUZZ_EXAMPLES (2000) examples each, fresh random seeds (takes minutes)"

$(STAMP): client/pyproject.toml server/pyproject.toml requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 needed (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./client -e './server[keras]' -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

$(TRITON_STAMP): tests/oip_client/requirements.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet -r tests/oip_client/requirements.txt
	touch $(TRITON_STAMP)

tritonclient-venv: $(TRITON_STAMP)

# Sessions are written to $(SNAPSHOT) when the server stops (Ctrl-C) and read back at the next `make run`.
SNAPSHOT ?= .run/sessions.snap

run: $(STAMP)
	@mkdir -p $(dir $(SNAPSHOT))
	$(BIN)/lstm-serve serve --model-dir models --snapshot $(SNAPSHOT)

test: $(STAMP) $(TRITON_STAMP)
	$(BIN)/python -m pytest tests

# The image and the compose topology built and run with a real Docker engine (tests/deploy; also run by `make test`).
# As root without a running engine it starts Debian's dockerd itself (host networking, state of its own) and makes
# the python base image from Debian packages when no registry is reachable; both are cached in .cache/docker.
docker-test: $(STAMP)
	$(BIN)/python -m pytest tests/deploy

lint: $(STAMP) proto-check
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code proto
	$(BIN)/buf breaking --against proto/lstm/v1/released.binpb
	$(BIN)/ruff check client server tests models bench deploy
	$(BIN)/ruff format --check client server tests models bench deploy
	$(BIN)/mypy

# lstm-client's tests in fresh venvs with the lowest and the highest protobuf/grpcio/numpy it allows, and installed
# beside tritonclient[grpc], against a server of this venv (tests/compat/run.py; needs the package registry).
client-compat: $(STAMP)
	$(BIN)/python -m tests.compat.run

bench: $(STAMP)
	$(BIN)/python -m bench.run

$(PROTO_STAMP): requirements-proto.txt
	test -x $(PROTO_VENV)/bin/python || $(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install --quiet -r requirements-proto.txt
	touch $(PROTO_STAMP)

proto: $(PROTO_STAMP)
	rm -rf $(PROTO_OUT)/lstm
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) proto/lstm/v1/lstm.proto
	# protoc writes absolute imports ("from lstm.v1 import ..."); the code lives inside lstm_client._proto.
	sed -i 's/^from lstm\.v1 import/from lstm_client._proto.lstm.v1 import/' $(PROTO_OUT)/lstm/v1/*.py
	touch $(PROTO_OUT)/lstm/__init__.py $(PROTO_OUT)/lstm/v1/__init__.py
	# The Open Inference Protocol (KServe v2) messages: only the server speaks them, so they live in its package.
	rm -rf $(OIP_OUT)/inference
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=$(OIP_OUT) --pyi_out=$(OIP_OUT) \
		--grpc_python_out=$(OIP_OUT) proto/inference/grpc_service.proto
	sed -i 's/^from inference import/from lstm_serve._proto.inference import/' $(OIP_OUT)/inference/*.py
	touch $(OIP_OUT)/__init__.py $(OIP_OUT)/inference/__init__.py

# Regenerates into a scratch copy and fails when the checked-in code differs from what proto/ produces.
proto-check: $(STAMP)
	rm -rf .proto-check && mkdir -p .proto-check
	cp -r $(PROTO_OUT) .proto-check/before
	cp -r $(OIP_OUT) .proto-check/before-oip
	$(MAKE) --no-print-directory proto
	diff -r -x __pycache__ .proto-check/before $(PROTO_OUT) || { echo "generated code is stale: run 'make proto' and commit"; exit 1; }
	diff -r -x __pycache__ .proto-check/before-oip $(OIP_OUT) || { echo "generated code is stale: run 'make proto' and commit"; exit 1; }
	rm -rf .proto-check

clean:
	rm -rf $(VENV) $(PROTO_VENV) $(TRITON_VENV) .proto-check .client-compat .pytest_cache .mypy_cache .ruff_cache

# The property-based tests of tests/fuzz with many more examples than CI runs, from fresh random seeds: thousands of
# random request sequences against a live server. A failure prints a @reproduce_failure blob; LSTM_FUZZ_SHRINK=1
# shrinks it to a minimal example first (slow).
FUZZ_EXAMPLES ?= 2000

fuzz-long: $(STAMP)
	LSTM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz --timeout=0 -q
