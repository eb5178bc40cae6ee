# Everything a fresh clone needs, with only Python 3.11 and make installed:
#   make run    the app + Datastore and Cloud Tasks emulators (Ctrl-C stops them)
#   make test   every test on Python 3.11, end-to-end, browser and slow (load, fault) ones
#               included, then all but the browser and slow ones on 3.12 and 3.13, each in
#               its own venv (.venv-3.12, .venv-3.13); a Python this machine lacks is named
#               in one line, at the end too (tests/pythons.py); after the 3.11 run, the
#               Datastore-backed suites again on Google's emulators (make test-google)
#   make test PYTHON=python3.13   every test on that one Python only
#   make test-fast  the in-process tests only, for the edit-test loop
#   make lint   ruff check + ruff format --check
#   make bench  the benchmarks
#   make mutation  mutation testing of the verification code (about 20 minutes; not in make test)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Re-installs when a requirements file is newer than the last install.
STAMP := $(VENV)/.installed

.PHONY: all venv run test test-google test-fast lint bench mutation clean distclean

all: test

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	# This checkout as the installed package: gae_deferred, gae_deferred.webapp2 (handlers/) and
	# gae_deferred.local (emulators/) import from the working tree.
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

# Options after ARGS, e.g. make run ARGS="--port 9000 --datastore-port 9001 --tasks-port 9002"
run: $(STAMP)
	GAE_DEFERRED_DEV_COMMAND='make run ARGS="{args}"' $(BIN)/gae-deferred-dev app.yaml $(ARGS)

# tests/pythons.py builds each version's venv with `make venv` and runs its tests; the
# browser tests need Chromium: it finds one (or installs it) first, and stops with one line
# saying what to install when that is not possible.
# Then, after the whole run, the Google emulator legs (tests/google_legs.py), also when it
# failed; a leg this machine cannot run (no Google Cloud SDK or Java) is named.
# Any Python runs it (standard library only): the venv's when there is one.
# KEEP_VENVS=1 uses the venvs as they are, however old (tests of make test itself).
test:
	@$(firstword $(wildcard $(BIN)/python) python3) tests/pythons.py --make "$(MAKE)" \
		$(if $(filter command line,$(origin PYTHON)),--only $(PYTHON)) \
		$(if $(KEEP_VENVS),--keep-venvs)

# The Datastore-backed suites on Google's Firestore emulator (Datastore mode) and legacy emulator.
test-google: $(STAMP)
	@chromium="$$($(BIN)/python tests/browser/chromium.py --install)" || exit 1; \
	GAE_DEFERRED_CHROMIUM="$$chromium" $(BIN)/python -m tests.google_legs

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e and not browser and not slow" --ignore=tests/reliability

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# One spot of _signing.py, context.py, envelope.py (verification, wire format) or the task
# handler changed at a time, against their in-process tests; prints the score and survivors
# (docs/reliability.md says why each survivor is equivalent). MUTATE=envelope: that one only.
mutation: $(STAMP)
	$(BIN)/python -m tests.mutation $(MUTATE)

# Local state (emulator data, signing key, logs) and caches; the venv stays.
clean:
	rm -rf .local test-output .pytest_cache .ruff_cache .hypothesis benchmarks/output
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .venv-3.* .venv-bench-legacy
