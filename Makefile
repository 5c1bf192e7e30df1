# Set-up, tests, demo and benchmarks. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned so pip takes the wheels on this machine's disk; override for other platforms,
# e.g. make setup TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.14.1 torchvision==0.29.1
DATA ?= data/fashiondet
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup fashion-mnist test demo bench bench-scale bench-fashiondet bench-scale-curve bench-seeds bench-search bench-probe clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist when we may install it; otherwise
# predet looks in $$PREDET_FASHION_MNIST or downloads it, and says how to get it if it can't.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ] && [ -z "$$PREDET_FASHION_MNIST" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

test: setup fashion-mnist
	$(BIN)/python -m pytest -q

# DEMO_SIZE=tiny runs the same steps as a one-minute smoke test (in its own folders).
DEMO_SIZE ?= small
demo: setup fashion-mnist
	$(BIN)/predet demo --size $(DEMO_SIZE) $(if $(filter tiny,$(DEMO_SIZE)),--out runs/demo_tiny --data data/fashiondet_tiny)

# BENCH_FLAGS=--quick for a minute each; the JSON each prints is what benchmarks/results/ keeps.
BENCH_FLAGS ?=
bench: setup fashion-mnist
	$(BIN)/python benchmarks/pretrain_speed.py $(BENCH_FLAGS) | tee benchmarks/results/pretrain_speed$(subst --,_,$(BENCH_FLAGS)).json
	$(BIN)/python benchmarks/finetune_speed.py $(BENCH_FLAGS) | tee benchmarks/results/finetune_speed$(subst --,_,$(BENCH_FLAGS)).json

# The paper-scale path's costs a CPU can measure (issue 17, ~8 min): FLOPs and peak memory of one
# R50-FPN 800 px PreDet step against a Mask R-CNN step, then the two-view loader against its floor
# (its cores-per-GPU estimate reads the step's FLOPs from step_cost.json, so step_cost runs first).
bench-scale: setup
	$(BIN)/python benchmarks/step_cost.py > benchmarks/results/step_cost.json.tmp && mv benchmarks/results/step_cost.json.tmp benchmarks/results/step_cost.json && cat benchmarks/results/step_cost.json
	$(BIN)/python benchmarks/loader_speed.py > benchmarks/results/loader_speed.json.tmp && mv benchmarks/results/loader_speed.json.tmp benchmarks/results/loader_speed.json && cat benchmarks/results/loader_speed.json

# The FashionDet benchmark (issue: does PreDet pay off?): pre-training variants, lr, warm-up, gamma
# chosen on val, 3 seeds on test, report + answers under benchmarks/results/fashiondet/.
bench-fashiondet: setup fashion-mnist
	$(BIN)/python benchmarks/fashiondet_benchmark.py $(BENCH_FASHIONDET_FLAGS)

# How much pre-training buys how much AP: PreDet and classification-only pre-trained for 200-1600
# iterations, each fine-tuned at 1x on test; table, plot and fit under benchmarks/results/fashiondet/scale/.
bench-scale-curve: setup fashion-mnist
	$(BIN)/python benchmarks/fashiondet_scale.py $(BENCH_SCALE_FLAGS)

# Pre-training seeds (PreDet, classification-only at seeds 1 and 2 beside the ladder's 0) and 3x
# settled (scratch and PreDet, 3 seeds, val AP every 150 iterations): benchmarks/results/fashiondet/seeds/.
bench-seeds: setup fashion-mnist
	$(BIN)/python benchmarks/fashiondet_seeds.py $(BENCH_SEEDS_FLAGS)

# Successive halving against the exhaustive Table-1 grid, scratch and PreDet, 3 final seeds each
# (issue 20): benchmarks/results/fashiondet/search/.
bench-search: setup fashion-mnist
	$(BIN)/python benchmarks/fashiondet_search.py $(BENCH_SEARCH_FLAGS)

# The transfer probe during pre-training against full 1x fine-tuning of the same checkpoints
# (issue 20): benchmarks/results/fashiondet/probe/.
bench-probe: setup fashion-mnist
	$(BIN)/python benchmarks/fashiondet_probe.py $(BENCH_PROBE_FLAGS)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
