# The README's commands. Everything runs inside .venv, created and filled here from the pinned requirements.
#   make reports [PROFILE=smoke] [JOBS=2] [OUT=dir]   run every notebook, render HTML, rebuild <out>/index.html
#   make test                                pytest over helpers + every notebook on the smoke profile
#   make lab [LAB_ARGS=...]                  JupyterLab with the venv's kernel (--allow-root as root)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PROFILE ?= full
JOBS   ?= 1
STAMP  := $(VENV)/.installed

.PHONY: setup reports test lab browser clean gpu-test gpu-bench

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name fp8rl --display-name "Python (fp8rl .venv)"
	touch $(STAMP)

# OUT defaults to results/ for the full profile and results-smoke/ (git-ignored) for smoke: a quick pass never
# overwrites the committed full-profile results.
reports: setup
	$(PY) -m helpers.run --profile $(PROFILE) --jobs $(JOBS) $(if $(OUT),--out $(OUT))

# Debian's chromium renders the gallery in the browser test; the test skips (and says why) where it cannot install.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    >/dev/null 2>&1 || echo "note: could not install chromium; the browser test will be skipped"; }

test: setup browser
	$(PY) -m pytest

# As root (a container, a cloud VM) Jupyter refuses to start without --allow-root: pass it when the uid is 0.
# LAB_ARGS adds options, e.g. make lab LAB_ARGS="--no-browser --port 8899 --ip 0.0.0.0".
# Notebooks run here write into results-interactive/ (git-ignored), not into the committed results/.
LAB_ARGS ?=
lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# The GPU tier, for a CUDA machine (CI's `make test` does not call these). Without a GPU both print why, run and
# write nothing, and fail: the recipe exits 7 (helpers.gpu_bench.NO_GPU_EXIT, not one of pytest's 1-5), which make
# reports as "Error 7" before exiting 2 itself, so a GPU job on a runner that lost its GPU does not pass empty.
#   make gpu-test    pytest -m gpu: the compiled kernels against the torch path at production shapes
#   make gpu-bench   python -m helpers.gpu_bench: results/gpu/{gemm,requant,attention,decode_layer}.csv + bench.json
# The nvidia-smi check comes first so that a CPU machine never starts a (re)install for nothing.
NO_GPU = { echo "$@: no NVIDIA GPU found (nvidia-smi lists none); nothing run, nothing written"; exit 7; }

gpu-test:
	@nvidia-smi -L >/dev/null 2>&1 || $(NO_GPU)
	$(MAKE) setup
	$(PY) -m helpers.gpu_bench --check
	$(PY) -m pytest -m gpu tests/test_gpu_*.py

gpu-bench:
	@nvidia-smi -L >/dev/null 2>&1 || $(NO_GPU)
	$(MAKE) setup
	$(PY) -m helpers.gpu_bench --out results/gpu
