# The README's two commands. Python 3.11; everything else comes from requirements.txt and pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
SHARED_DATA ?= ../shared/data

.PHONY: demo test notebook build

# The virtualenv, and the project installed into it (`pip install .`: pyproject.toml's pinned
# dependencies, and the oneDNN extension of csrc/ compiled by CMake into site-packages/models/,
# see CMakeLists.txt); reinstalled when the build's inputs change.
ONEDNN_SOURCES := $(wildcard csrc/*.cc csrc/*.h)
$(VENV)/installed: requirements.txt pyproject.toml CMakeLists.txt $(ONEDNN_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-build-isolation . \
	  || { echo "error: installing the project (building the oneDNN extension) failed, see above; retry with: make build" >&2; exit 1; }
	touch $@
build: $(VENV)/installed

# Trains the offline demo (scikit-learn digits, ResNet-8, LARS).
demo: $(VENV)/installed
	$(VENV)/bin/python main.py --config=configs/demo.py --workdir=/tmp/largebatch_demo

# Opens the trust-ratio notebook in Jupyter (installed on first use); WORKDIR defaults to the demo's.
notebook: $(VENV)/installed
	$(VENV)/bin/pip install -q -r notebooks/requirements.txt
	$(VENV)/bin/jupyter notebook notebooks/trust_ratios.ipynb

# The whole test suite; then the oneDNN layers' and networks' checks against float64 again,
# compiled with XLA's optimizations on (the suite skips most of them for its time: conftest.py),
# as main.py compiles. The multi-process tests use Open MPI's mpirun and the
# cross-host tests make network-namespace hosts with iproute2 (Debian's
# openmpi-bin and iproute2, installed here when missing; they need root).
test: $(VENV)/installed
	command -v mpirun >/dev/null && command -v ip >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq openmpi-bin iproute2 >/dev/null)
	LARGEBATCH_SHARED_DATA=$(SHARED_DATA) $(VENV)/bin/python -m pytest -q --durations=25
	JAX_DISABLE_MOST_OPTIMIZATIONS=0 $(VENV)/bin/python -m pytest -q -m optimized
