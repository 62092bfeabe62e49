# The README's two commands. Python 3.11; everything else comes from requirements.txt.
PYTHON ?= python3.11
VENV := .venv
SHARED_DATA ?= ../shared/data

.PHONY: demo test notebook build

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# The oneDNN convolutions, matmuls, max pooling and BatchNorm (csrc/): XLA FFI headers from the
# pinned jaxlib, oneDNN 3.2 headers and library from the pinned onednn-*-cpu-gomp wheels in the
# virtualenv.
ONEDNN_EXTENSION := build/liblargebatch_onednn.so
ONEDNN_SOURCES := csrc/onednn_conv.cc csrc/onednn_batch_norm.cc csrc/onednn_matmul.cc csrc/onednn_pooling.cc
build: $(ONEDNN_EXTENSION)
$(ONEDNN_EXTENSION): $(ONEDNN_SOURCES) csrc/onednn_common.h $(VENV)/installed
	@mkdir -p build
	g++ -O2 -std=c++17 -shared -fPIC -fopenmp -Wall \
	  -isystem "$$($(VENV)/bin/python -c 'import jax; print(jax.ffi.include_dir())')" -I$(VENV)/include \
	  $(ONEDNN_SOURCES) -o $@ -L$(VENV)/lib -ldnnl -Wl,-rpath,'$$ORIGIN/../$(VENV)/lib' \
	  || { echo "error: building the oneDNN extension failed (see above); retry with: make build" >&2; exit 1; }

# Trains the offline demo (scikit-learn digits, ResNet-8, LARS).
demo: $(VENV)/installed $(ONEDNN_EXTENSION)
	$(VENV)/bin/python main.py --config=configs/demo.py --workdir=/tmp/largebatch_demo

# Opens the trust-ratio notebook in Jupyter (installed on first use); WORKDIR defaults to the demo's.
notebook: $(VENV)/installed $(ONEDNN_EXTENSION)
	$(VENV)/bin/pip install -q -r notebooks/requirements.txt
	$(VENV)/bin/jupyter notebook notebooks/trust_ratios.ipynb

# The whole test suite. The multi-process tests use Open MPI's mpirun and the
# cross-host tests make network-namespace hosts with iproute2 (Debian's
# openmpi-bin and iproute2, installed here when missing; they need root).
test: $(VENV)/installed $(ONEDNN_EXTENSION)
	command -v mpirun >/dev/null && command -v ip >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq openmpi-bin iproute2 >/dev/null)
	LARGEBATCH_SHARED_DATA=$(SHARED_DATA) $(VENV)/bin/python -m pytest -q --durations=25
