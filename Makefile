# The README's two commands. Python 3.11; everything else comes from requirements.txt.
PYTHON ?= python3.11
VENV := .venv
SHARED_DATA ?= ../shared/data

.PHONY: demo test notebook

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Trains the offline demo (scikit-learn digits, ResNet-8, LARS).
demo: $(VENV)/installed
	$(VENV)/bin/python main.py --config=configs/demo.py --workdir=/tmp/largebatch_demo

# Opens the trust-ratio notebook in Jupyter (installed on first use); WORKDIR defaults to the demo's.
notebook: $(VENV)/installed
	$(VENV)/bin/pip install -q -r notebooks/requirements.txt
	$(VENV)/bin/jupyter notebook notebooks/trust_ratios.ipynb

# The whole test suite. The multi-process tests use Open MPI's mpirun and the
# cross-host tests make network-namespace hosts with iproute2 (Debian's
# openmpi-bin and iproute2, installed here when missing; they need root).
test: $(VENV)/installed
	command -v mpirun >/dev/null && command -v ip >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq openmpi-bin iproute2 >/dev/null)
	LARGEBATCH_SHARED_DATA=$(SHARED_DATA) $(VENV)/bin/python -m pytest -q
