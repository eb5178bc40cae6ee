# Everything a fresh clone needs, with only Python 3.11 and make installed:
#   make run    the app + Datastore and Cloud Tasks emulators (Ctrl-C stops them)
#   make test   every test, end-to-end, browser and slow (load, fault) ones included, then the
#               Datastore-backed suites again on Google's emulators (make test-google)
#   make test-fast  the in-process tests only, for the edit-test loop
#   make lint   ruff check + ruff format --check
#   make bench  the benchmarks
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Re-installs when a requirements file is newer than the last install.
STAMP := $(VENV)/.installed

.PHONY: all venv run test test-google test-fast lint bench clean distclean

all: test

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	# This checkout as the installed package: gae_deferred, gae_deferred.webapp2 (handlers/) and
	# gae_deferred.local (emulators/) import from the working tree.
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

run: $(STAMP)
	$(BIN)/gae-deferred-dev app.yaml

# The browser tests need Chromium: find one (or install it) first, and stop with one line
# saying what to install when that is not possible.
# Then the Google emulator legs (tests/google_legs.py), also when the main run failed; a leg
# this machine cannot run (no Google Cloud SDK or Java) is named, with what to install.
test: $(STAMP)
	@chromium="$$($(BIN)/python tests/browser/chromium.py --install)" || exit 1; \
	echo "browser tests: $$chromium"; \
	$(BIN)/python -m tests.google_legs --check; \
	GAE_DEFERRED_CHROMIUM="$$chromium" $(BIN)/python -m pytest; main=$$?; \
	GAE_DEFERRED_CHROMIUM="$$chromium" $(BIN)/python -m tests.google_legs; google=$$?; \
	test $$main -eq 0 && test $$google -eq 0

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

# Local state (emulator data, signing key, logs) and caches; the venv stays.
clean:
	rm -rf .local test-output .pytest_cache .ruff_cache .hypothesis benchmarks/output
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .venv-bench-legacy
