# Every target that needs Python first brings .venv up to date, so `make run` and `make test` work as the very first
# command on a fresh machine. PYTHON picks the interpreter that builds the venv (3.11 or newer).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO_OUT := client/lstm_client/_proto

.PHONY: help venv run test docker-test lint proto proto-check bench clean fuzz-long

help:
	@echo "make run     serve the bundled models on 127.0.0.1:50051 (metrics on :9464); sessions kept across restarts"
	@echo "make test    run the whole test suite"
	@echo "make docker-test  build the image and bring up docker-compose.yml for real (part of make test; needs root or an engine)"
	@echo "make lint    ruff + mypy + generated-code check"
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

# Sessions are written to $(SNAPSHOT) when the server stops (Ctrl-C) and read back at the next `make run`.
SNAPSHOT ?= .run/sessions.snap

run: $(STAMP)
	@mkdir -p $(dir $(SNAPSHOT))
	$(BIN)/lstm-serve serve --model-dir models --snapshot $(SNAPSHOT)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# The image and the compose topology built and run with a real Docker engine (tests/deploy; also run by `make test`).
# As root without a running engine it starts Debian's dockerd itself (host networking, state of its own) and makes
# the python base image from Debian packages when no registry is reachable; both are cached in .cache/docker.
docker-test: $(STAMP)
	$(BIN)/python -m pytest tests/deploy

lint: $(STAMP) proto-check
	$(BIN)/ruff check client server tests models bench deploy
	$(BIN)/ruff format --check client server tests models bench deploy
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.run

proto: $(STAMP)
	rm -rf $(PROTO_OUT)/lstm
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) proto/lstm/v1/lstm.proto
	# protoc writes absolute imports ("from lstm.v1 import ..."); the code lives inside lstm_client._proto.
	sed -i 's/^from lstm\.v1 import/from lstm_client._proto.lstm.v1 import/' $(PROTO_OUT)/lstm/v1/*.py
	touch $(PROTO_OUT)/lstm/__init__.py $(PROTO_OUT)/lstm/v1/__init__.py

# Regenerates into a scratch copy and fails when the checked-in code differs from what proto/ produces.
proto-check: $(STAMP)
	rm -rf .proto-check && mkdir -p .proto-check
	cp -r $(PROTO_OUT) .proto-check/before
	$(MAKE) --no-print-directory proto
	diff -r -x __pycache__ .proto-check/before $(PROTO_OUT) || { echo "generated code is stale: run 'make proto' and commit"; exit 1; }
	rm -rf .proto-check

clean:
	rm -rf $(VENV) .proto-check .pytest_cache .mypy_cache .ruff_cache

# The property-based tests of tests/fuzz with many more examples than CI runs, from fresh random seeds: thousands of
# random request sequences against a live server. A failure prints a @reproduce_failure blob; LSTM_FUZZ_SHRINK=1
# shrinks it to a minimal example first (slow).
FUZZ_EXAMPLES ?= 2000

fuzz-long: $(STAMP)
	LSTM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz --timeout=0 -q
