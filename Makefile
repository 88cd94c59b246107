# Every target bootstraps its own virtual environment: a fresh machine needs only python3 and make.
PYTHON ?= python3
AIRFLOW_VERSION ?=
VENV ?= .venv$(if $(AIRFLOW_VERSION),-airflow-$(AIRFLOW_VERSION),)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The lock pins the newest supported Airflow; an explicit AIRFLOW_VERSION resolves afresh around it.
CONSTRAINTS := $(if $(AIRFLOW_VERSION),,--constraint requirements/constraints.txt)
AIRFLOW_PIN := $(if $(AIRFLOW_VERSION),apache-airflow==$(AIRFLOW_VERSION),)
export AIRFLOW__CORE__LOAD_EXAMPLES := False

.PHONY: venv test demo bench lint format docs e2e clean lock

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "uv>=0.4"
	$(BIN)/uv pip install --python $(BIN)/python $(CONSTRAINTS) -e ".[test,lint]" $(AIRFLOW_PIN)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m airflow_provider_jimeng.demo --output demo-output

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy airflow_provider_jimeng

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock:
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install --quiet uv
	.venv-lock/bin/uv pip compile --quiet --python-version 3.10 --universal -o requirements/constraints.txt \
		--extra test --extra lint pyproject.toml
	rm -rf .venv-lock

clean:
	rm -rf .venv .venv-* demo-output site
