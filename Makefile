# The two commands of the README:
#   make demo   set up .venv if needed, run the offline demo end to end, write figures/
#   make test   set up .venv if needed, run the package tests and the notebook checks
# and, while developing, make test-fast: the units and contracts, in under 3 minutes
# Everything installs from the package registry; nothing else is downloaded.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: setup demo foundation-demo test test-fast test-package test-notebooks test-foreign test-report lab sources \
        benchmark book test-site \
        clean-demo \
        mechanisms notebooks tolerances

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,parquet,lidc]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/sm run configs/demo.yaml

# the foundation grid's offline rehearsal: small random ViTs in each published format, both
# modes (about 3.5 min on 2 cores)
foundation-demo: $(STAMP)
	$(BIN)/sm run configs/foundation_demo.yaml

# pytest on $(JOBS) processes (pytest-xdist): each test file, and the notebooks together, is one
# unit of work; conftest.py orders the units, longest first. JOBS=0 runs in this process.
JOBS   ?= 2
PYTEST := $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder
# the notebook checks: each notebook re-executed, its outputs compared with the committed ones
NBVAL  := --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:randomly

# the package tests and the notebook checks in one run, so that both processes stay busy
test: $(STAMP)
	$(BIN)/lint-imports
	$(PYTEST) $(NBVAL) tests notebooks

# units and contracts: no test that trains or runs a model (marker numerics), no slow or site one
test-fast: $(STAMP)
	$(BIN)/lint-imports
	$(PYTEST) -m "not numerics and not slow and not site" tests

test-package: $(STAMP)
	$(BIN)/lint-imports
	$(PYTEST) tests

test-notebooks: $(STAMP)
	$(PYTEST) $(NBVAL) notebooks

# make test-foreign   what another CPU's kernels can change, with those kernels and the numerics
#                     left unpinned, as a user on another platform (e.g. arm64) runs them: the
#                     tests marked numerics (every test that runs a model; tests/conftest.py
#                     fails one that lacks the marker) and the notebooks, whose float results
#                     must then hold within the measured cross-CPU spread
#                     (docs/REPRODUCIBILITY.md). FOREIGN_NUMERICS=... chooses other kernels.
FOREIGN_NUMERICS ?= SM_NUMERICS=native ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 \
                    MKL_CBWR=AVX
test-foreign: $(STAMP)
	env $(FOREIGN_NUMERICS) $(PYTEST) $(NBVAL) -m numerics tests notebooks

# make notebooks   re-execute every notebook in place with its defaults and record the float
#                  results it checks as its new reference (data/reference/notebooks/); commit both
notebooks: $(STAMP)
	for nb in notebooks/0*.ipynb; do \
	  SM_RECORD_REFERENCE=1 $(BIN)/sm notebook $$nb $$nb || exit 1; done

# make tolerances  the notebooks' tolerances from the spread over 10 training seeds (notebooks 00,
#                  01, 03 and 05 per seed in a scratch project, about 70 min on 2 cores; values
#                  kept in runs/notebook_seeds, so an interrupted run resumes), then stored beside
#                  the references (data/reference/notebooks/). After a change to what the
#                  notebooks compute: rm -rf runs/notebook_seeds && make notebooks tolerances
SEEDS ?= 1 2 3 4 5 6 7 8 9 10
tolerances: $(STAMP)
	$(BIN)/python benchmarks/notebook_spread.py --seeds $(SEEDS)
	$(BIN)/python benchmarks/notebook_spread.py --from-seeds

lab: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[lab]"
	$(BIN)/jupyter lab notebooks

sources: $(STAMP)
	$(BIN)/sm notebook notebooks/00_source_pretraining.ipynb runs/00_source_pretraining.ipynb

# notebook 05 (confounder probes and attribution) with its defaults; the executed copy goes to
# runs/, its figures to figures/ (about 8 min on 2 cores)
mechanisms: $(STAMP)
	$(BIN)/sm notebook notebooks/05_mechanisms.ipynb runs/05_mechanisms.ipynb

benchmark: $(STAMP)
	$(BIN)/python benchmarks/phantom_learnability.py

# make book        the site: README, the executed notebooks (never re-executed; a notebook without
#                  outputs stops it, named), docs/ and the demo's paper kit, in the reading order
#                  of book/_toc.yml, into _build/book/html (open _build/book/html/index.html)
# make test-site   builds the site, then opens every page in Debian's headless chromium (tests
#                  marked site): pages load, images decode, internal links resolve; installs
#                  chromium and chromium-driver first when they are missing (root, or sudo)
BOOK_STAMP := $(VENV)/.book-stamp
$(BOOK_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,parquet,lidc,book]"
	touch $(BOOK_STAMP)

book: $(BOOK_STAMP)
	$(BIN)/python book/build.py

CHROMIUM_PACKAGES := chromium chromium-driver
test-site: book
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  echo "installing $(CHROMIUM_PACKAGES) (chromium or chromedriver missing)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(CHROMIUM_PACKAGES) >/dev/null; \
	fi
	$(BIN)/python -m pytest -m site -p no:randomly tests/test_site.py

# make test-python PY=python3.13   the package tests under another Python (3.11-3.13) in its own
#                                  venv (.venv-python3.13), with the same locked versions
PY ?= python3.13
PY_VENV := .venv-$(notdir $(PY))
.PHONY: test-python
test-python:
	$(PY) -m venv $(PY_VENV)
	$(PY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PY_VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,parquet,lidc]"
	$(PY_VENV)/bin/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder tests

# make test-slurm   the SLURM tests (tests/slurm, marker slurm) on a one-node cluster that the
#                   tests start as their own processes; installs Debian's SLURM and munge first
#                   when they are missing (root, or sudo)
SLURM_PROGRAMS := slurmctld slurmd munged sbatch squeue scancel sinfo srun
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: test-slurm
test-slurm: $(STAMP)
	@missing=; for p in $(SLURM_PROGRAMS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(SLURM_PACKAGES) (missing:$$missing)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(SLURM_PACKAGES) >/dev/null; \
	fi
	$(BIN)/python -m pytest -m slurm tests

# make test-report   the paper kit's LaTeX tables compiled by a real TeX engine (tests marked
#                    report; skipped by make test where pdflatex or siunitx is missing);
#                    installs Debian's texlive-latex-base, texlive-latex-recommended and
#                    texlive-science (siunitx, for the tables' numbers) first when either is
TEX_PACKAGES := texlive-latex-base texlive-latex-recommended texlive-science
test-report: $(STAMP)
	@if ! command -v pdflatex >/dev/null 2>&1 || ! kpsewhich siunitx.sty >/dev/null 2>&1; then \
	  echo "installing $(TEX_PACKAGES) (pdflatex or siunitx missing)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(TEX_PACKAGES) >/dev/null; \
	fi
	$(BIN)/python -m pytest -m report tests  # the LaTeX compiled, its numbers against results.csv

# make gpu-wheels      the wheels the GPU check carries to a GPU machine that reaches no package
#                      registry (Python 3.12, its own torch): what sm_utils needs beyond the image's
#                      packages (benchmarks/gpu_image.txt), for CPython 3.12 on manylinux x86-64 at
#                      the lock's versions, into .gpu-wheels/ (git-ignored); prints the folder's and
#                      the tracked checkout's sizes and fails if together they pass 64 MiB
GPU_WHEELS := .gpu-wheels
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py --dest $(GPU_WHEELS)

# make gpu-rehearsal   the GPU check rehearsed here as on the GPU machine: a Python 3.12 environment
#                      of only the image's packages (.venv-gpu-rehearsal, kept; about 6 GB with
#                      torch's CUDA build), the wheels of .gpu-wheels installed by gpu_check.sh (no
#                      index, no deps, into a folder on PYTHONPATH), every step on the CPU
#                      (--cpu-rehearsal); then the same with papermill's wheel left out, which must
#                      stop at the set-up naming it (tests/test_gpu_rehearsal.py, -m gpu_rehearsal)
GPU_VENV  := .venv-gpu-rehearsal
GPU_STAMP := $(GPU_VENV)/.installed-stamp
GPU_PY ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; \
  done)
.PHONY: gpu-rehearsal
$(GPU_STAMP): benchmarks/gpu_image.txt constraints.txt
	@[ -n "$(GPU_PY)" ] || { echo "no Python 3.12 found: make gpu-rehearsal GPU_PY=/path/to/python3.12"; exit 1; }
	rm -rf $(GPU_VENV)
	$(GPU_PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet -c constraints.txt -r benchmarks/gpu_image.txt
	touch $(GPU_STAMP)

gpu-rehearsal: $(STAMP) $(GPU_STAMP)
	@[ -f $(GPU_WHEELS)/wheels.txt ] || $(MAKE) gpu-wheels
	$(BIN)/python -m pytest -m gpu_rehearsal -p no:randomly -s -v tests/test_gpu_rehearsal.py
