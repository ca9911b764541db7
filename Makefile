# gfnmap: the two commands (`make run`, `make test`) and their helpers.
# Every target installs what is missing first (scripts/install-deps.sh), so a fresh Debian works.
.PHONY: all deps build run test test-release test-asan test-tsan bench soak fuzz clean

JOBS ?= $(shell nproc)
GFNMAP = build/release/tools/gfnmap/gfnmap

all: build

deps:
	@scripts/install-deps.sh

build: deps
	@cmake --preset release >/dev/null
	@cmake --build --preset release -j $(JOBS)

# The main job on its default workload: builds only the CLI it runs.
run: deps
	@cmake --preset release >/dev/null
	@cmake --build --preset release -j $(JOBS) --target gfnmap_cli
	$(GFNMAP) run

test: test-release test-asan test-tsan
	@echo "make test: release, asan+ubsan and tsan suites all passed"

test-release: build
	ctest --preset release

test-asan: deps
	@cmake --preset asan >/dev/null
	@cmake --build --preset asan -j $(JOBS)
	ctest --preset asan

test-tsan: deps
	@cmake --preset tsan >/dev/null
	@cmake --build --preset tsan -j $(JOBS)
	ctest --preset tsan

bench: build
	@for b in build/release/bench/bench_*; do echo "== $$b"; $$b --benchmark_repetitions=5 \
	  --benchmark_report_aggregates_only=true || exit 1; done

# Longer soak of the concurrency tests (not part of `make test`).
soak: build
	ctest --test-dir build/release -L slow --output-on-failure

# libFuzzer targets of fuzz/ (clang, ASan + UBSan), FUZZ_SECONDS each (not part of `make test`,
# which replays their corpora in the asan suite).
FUZZ_SECONDS ?= 60
fuzz: deps
	@cmake --preset fuzz >/dev/null
	@cmake --build --preset fuzz -j $(JOBS)
	scripts/fuzz.sh $(FUZZ_SECONDS)

clean:
	rm -rf build
