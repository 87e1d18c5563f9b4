# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first (once).
# Python writes the bytecode of what it imports, once, even where the environment says not to (as on our CI
# machines): compiling all 23,000 files of the installed packages up front took 22 s of a fresh clone's `make test`,
# most of them never imported; without bytecode at all, every process would compile torch again.
unexport PYTHONDONTWRITEBYTECODE
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_MODEL := models/SmolLM2-135M-Instruct

.PHONY: setup test demo demo-model bench clean

setup: $(STAMP)

# Re-install only when the pins change (requirements.txt, and the test tools' pins here); a present, up-to-date .venv
# makes this a no-op. uv (pinned, into the venv) installs the same pins as pip in a fraction of the time: it unpacks
# in parallel (3.6 s from its cache, against 25.6 s when it also compiles every file's bytecode). uv reads neither
# pip.conf nor PIP_* variables, so it gets the wheel folders and indexes pip is configured with (on our machines the
# local CPU build of torch and a package mirror), the best version across all of them chosen as pip does.
TOOLS := pytest==9.2.0 pytest-xdist==3.8.0 openai==3.57.0 selenium==4.51.0 mlflow-skinny==3.18.0 wandb==0.31.0 \
         lm-eval==0.4.13
PIP_SOURCES = $(shell $(PY) -m pip config list 2>/dev/null \
  | sed -n "s/^[^.]*\.\(find-links\|extra-index-url\|index-url\)='\(.*\)'$$/\1 \2/p" \
  | while read key values; do for v in $$values; do printf -- '--%s %s ' "$$key" "$$v"; done; done)
$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==0.13.10
	$(VENV)/bin/uv pip install --quiet --python $(PY) --index-strategy unsafe-best-match \
	  $(PIP_SOURCES) -r requirements.txt $(TOOLS)
	touch $(STAMP)

# On a fresh clone no module has its bytecode yet, and both pytest workers would compile the same ones at once while
# collecting (30 s against 10 s each with bytecode, on the 2-core EPYC). While the demo model converts (one core,
# mostly), a collection of the tests writes that bytecode once; `make demo`'s scripts import the same libraries.
$(DEMO_MODEL)/config.json: | $(STAMP)
	$(PY) -m pytest -q --collect-only -p no:cacheprovider tests >/dev/null 2>&1 & \
	$(PY) -m common.demo_model $(DEMO_MODEL); status=$$?; wait; exit $$status

demo-model: $(DEMO_MODEL)/config.json

# Two workers, a test file each at a time (a file's server and model fixtures start once), one torch thread each:
# most of a test's time is one core's (imports, subprocess start-ups, Python), and two workers that each spin up
# every core slow each other far more than twice. 6 min 46 s -> about 5 min on the 2-core AVX2 EPYC.
# --no-loadscope-reorder: files are handed out in collection order, the slowest first (tests/conftest.py), not by
# their number of tests, which sent the few long tests of the bench and the launches to the end, one worker idle
# (fresh clones of the same code, 2026-12-07: 4 min 12 s against 4 min 46 s).
test: $(STAMP) demo-model
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10 tests

# Train (starting over if an earlier demo run exists), merge into shards with a logit check, ask one question, then
# compare the tuned model with its base on held-out conversations.
demo: $(STAMP) demo-model
	$(PY) train.py recipes/demo_smollm2.yaml --force
	$(PY) merge.py --verify --max-shard-size 200MB
	$(PY) chat.py --once "我最近总是失眠，晚上躺在床上脑子停不下来，怎么办？"
	$(PY) eval.py --limit 1 --max-new-tokens 48

bench: $(STAMP) demo-model
	$(PY) bench/run.py

clean:
	rm -rf work_dirs
