# The two commands a newcomer needs: `make demo` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf outbox
	$(BIN)/smartmail send examples/recipients.csv \
		--template examples/welcome.txt \
		--transport file://outbox --state outbox/smartmail.db --yes
	@echo "The messages are in ./outbox (one .eml each). The same send again: the ledger sends nothing twice."
	$(BIN)/smartmail send examples/recipients.csv --template examples/welcome.txt \
		--transport file://outbox --state outbox/smartmail.db --yes --progress none | grep -E "sent|skipped|already"

lint: $(STAMP)
	$(BIN)/ruff check smartmail tests benchmarks
	$(BIN)/ruff format --check smartmail tests benchmarks
	$(BIN)/mypy
	$(BIN)/cfn-lint deploy/template.yaml

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint pytest

docs: $(STAMP)
	$(BIN)/python -c "from smartmail.cli import reference; print(reference())" > docs/cli.md

# Every scenario of docs/benchmarks.md (about 10 minutes on 2 cores), then one table:
# figure, bare baseline, ratio, target. Run it on a quiet machine.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --json bench-results.json

clean:
	rm -rf $(VENV) outbox .pytest_cache .mypy_cache .ruff_cache
