# The two commands a newcomer needs: `make run` and `make test`. Each installs
# what is missing first (libtorch, once per machine, into ~/.cache/harness).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo

# libtorch/install is a no-op once installed and prints the libtorch folder.
WITH_LIBTORCH = command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs, then run make again" >&2; exit 1; }; \
	lt="$$(libtorch/install)"; export LIBTORCH="$$lt";

.PHONY: help run test bench lint fmt build release gpu-check libtorch clean

help:
	@echo "make run        show GPU access, then serve a demo model through the engine"
	@echo "make test       run every test (installs libtorch first if missing)"
	@echo "make bench      benchmarks (results go in BENCHMARKS.md)"
	@echo "make lint       cargo fmt --check and clippy -D warnings"
	@echo "make release    build target/release/harness"
	@echo "make gpu-check  prepare the check for a lent GPU machine (scripts/gpu-check)"

libtorch:
	@libtorch/install

# A real node serving a traced demo model (inputs f32[4]) from a local folder: no
# network. HARNESS_DEVICE defaults to auto here, so a laptop uses its CPU.
# Ctrl-C (or SIGTERM) drains and stops it.
DEMO_MODEL_DIR := target/demo-model
run:
	@$(WITH_LIBTORCH) $(CARGO) build --bin harness
	@# gpu-check exits 1 on a machine without a GPU: that is an answer, not a failure.
	@echo "== harness gpu-check"; $(WITH_LIBTORCH) $(CARGO) run -q --bin harness -- gpu-check || [ $$? -eq 1 ]
	@$(WITH_LIBTORCH) $(CARGO) run -q --bin harness -- demo --write-model $(DEMO_MODEL_DIR) >/dev/null
	@echo; echo "== harness serve: the demo model from $(DEMO_MODEL_DIR) on HARNESS_DEVICE=$${HARNESS_DEVICE:-auto}"
	@echo "   It takes Run requests of f32[N,4] tensors in process group harness.serving.$${HARNESS_SERVING_NAME:-default}."
	@echo "   Watch it: curl localhost:8080/status, /health/ready, /metrics (HARNESS_HTTP_ADDR)."
	@echo "   Call it: HARNESS_COOKIE=dev-cookie-change-me harness call --node 127.0.0.1:9000 --tensor 1,4:0.1,0.2,0.3,0.4"
	@echo "   (the cookie is HARNESS_COOKIE, or this Makefile's dev default). Ctrl-C drains and stops it."
	@$(WITH_LIBTORCH) HARNESS_DEVICE="$${HARNESS_DEVICE:-auto}" HARNESS_MODEL_DIR="$(DEMO_MODEL_DIR)" \
		HARNESS_WARMUP_INPUTS="$${HARNESS_WARMUP_INPUTS:-f32[4]}" HARNESS_COOKIE="$${HARNESS_COOKIE:-dev-cookie-change-me}" exec $(CARGO) run -q --bin harness -- serve

test:
	@$(WITH_LIBTORCH) $(CARGO) test --workspace
	@# The client crate must build with no libtorch anywhere in sight.
	@env -u LIBTORCH -u LIBTORCH_USE_PYTORCH $(CARGO) build -q -p harness-client
	@echo "harness-client builds without libtorch"

# Side-by-side benchmarks, release build; see BENCHMARKS.md.
bench:
	@$(WITH_LIBTORCH) $(CARGO) bench --bench fetch --bench serving --bench cluster

lint:
	$(CARGO) fmt --all -- --check
	@$(WITH_LIBTORCH) $(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

build:
	@$(WITH_LIBTORCH) $(CARGO) build --workspace

release:
	@$(WITH_LIBTORCH) $(CARGO) build --release --bin harness

gpu-check:
	@scripts/gpu-check

clean:
	$(CARGO) clean
	rm -rf dist
