# Every target bootstraps its own virtual environment: a fresh machine needs only python3 and make.
PYTHON ?= python3
AIRFLOW_VERSION ?=
VENV ?= .venv$(if $(AIRFLOW_VERSION),-airflow-$(AIRFLOW_VERSION),)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The lock pins the newest supported Airflow; an explicit AIRFLOW_VERSION resolves afresh around it,
# within requirements/airflow-<major>.<minor>.txt where that series needs older libraries (docs/compatibility.md).
AIRFLOW_SERIES := $(word 1,$(subst ., ,$(AIRFLOW_VERSION))).$(word 2,$(subst ., ,$(AIRFLOW_VERSION)))
SERIES_CONSTRAINTS := $(if $(AIRFLOW_VERSION),$(wildcard requirements/airflow-$(AIRFLOW_SERIES).txt),)
CONSTRAINTS := $(if $(AIRFLOW_VERSION),$(addprefix --constraint ,$(SERIES_CONSTRAINTS)),--constraint requirements/constraints.txt)
AIRFLOW_PIN := $(if $(AIRFLOW_VERSION),apache-airflow==$(AIRFLOW_VERSION),)
export AIRFLOW__CORE__LOAD_EXAMPLES := False
# Some machines set PYTHONDONTWRITEBYTECODE=1 and uv installs without bytecode: every Python process
# would then compile Airflow's ~1,400 modules from source again (about 3 s of CPU a process on 2 cores,
# about a quarter of `make test`). Let Python cache the bytecode of what it imports, inside the venv.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv test demo bench lint format docs e2e package-check scale clean lock compat

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt $(SERIES_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "uv>=0.4"
	$(BIN)/uv pip install --python $(BIN)/python $(CONSTRAINTS) -e ".[test,lint]" $(AIRFLOW_PIN)
	touch $(STAMP)

# Three workers on two cores: about a fifth of the suite waits on sockets, timeouts and child processes,
# so a third worker fills that time (3:42 against 4:25 with two on the same machine). The suite waits on
# events, never on sleeps: it also passes with six workers on two cores.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The suite on the newest release of each supported series, each in its own venv (about 4 x `make test`:
# for a quiet machine). Writes compat-output/summary.md, which docs/compatibility.md quotes. One series:
# `make compat COMPAT_VERSIONS=3.0.6`; a quick subset: `make compat PYTEST_ARGS="tests/hooks"`.
COMPAT_VERSIONS ?= 3.0.6 3.1.8 3.2.2 3.3.2
compat:
	$(PYTHON) scripts/compat.py --workers $(TEST_WORKERS) --pytest-args "$(PYTEST_ARGS)" $(COMPAT_VERSIONS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --output demo-output $(if $(API),--api $(API))

# The bench extra (matplotlib, for the scaling plot; Pillow and Playwright for P8) goes into the same venv
# on demand. P5 (the shared account limit) needs a real Redis: Debian's redis-server, installed when missing
# (fakeredis stands in only for `python -m bench --quick`). P8 (the gallery) drives Debian's chromium.
bench: $(STAMP)
	test -x /usr/bin/redis-server || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; }
	test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(CONSTRAINTS) -e ".[bench]"
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy airflow_provider_jimeng

# The docs extra goes into the same venv on demand (most targets never need it).
docs: $(STAMP)
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(CONSTRAINTS) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock:
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install --quiet uv
	.venv-lock/bin/uv pip compile --quiet --python-version 3.10 --universal -o requirements/constraints.txt \
		--extra test --extra lint --extra docs --extra e2e --extra redis --extra scale --extra gallery pyproject.toml
	rm -rf .venv-lock

# The browser end-to-end test (opt-in, about 2 minutes): a real Airflow on loopback driven in headless
# Debian Chromium by Playwright; refreshes the screenshots in docs/img. Never `playwright install`.
E2E_SCREENSHOT_DIR ?= docs/img
e2e: $(STAMP)
	test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(CONSTRAINTS) -e ".[e2e]"
	JIMENG_E2E=1 JIMENG_E2E_SCREENSHOT_DIR=$(E2E_SCREENSHOT_DIR) $(BIN)/python -m pytest -q -s -m e2e tests/e2e $(PYTEST_ARGS)

# The packaging check (opt-in, a few minutes): builds the sdist and wheel, installs the wheel into a fresh
# venv and runs docs/getting-started.md's own commands (scripts/getting-started.sh) against it.
package-check: $(STAMP)
	UV=$(BIN)/uv PYTHON=$(PYTHON) bash scripts/package-check.sh

# The CeleryExecutor proof (opt-in, about 3-5 minutes; docs/scaling.md "The proof: make scale"): PostgreSQL,
# Redis, the emulator, moto's S3, an api-server, scheduler, dag-processor and two Celery workers on loopback;
# kills a worker mid-run and checks pools, storage, billing and the rate cap. Report in scale-output/.
PG_BIN ?= $(firstword $(wildcard /usr/lib/postgresql/*/bin))
scale: $(STAMP)
	test -x /usr/bin/redis-server || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; }
	test -n "$(PG_BIN)" || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(CONSTRAINTS) -e ".[scale]"
	$(BIN)/python scripts/scale.py $(SCALE_ARGS)

clean:
	rm -rf .venv .venv-* demo-output site scale-output
