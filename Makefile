# The README's two commands: `make up` (set up, train, publish, start Triton + server, demo query)
# and `make test` (set up, lint, type-check, run the whole suite). .ci/run calls `make test`.
.PHONY: setup up test lint typecheck protos reliability

setup:
	./scripts/setup

up: setup
	.venv/bin/recsvc up

lint: setup
	.venv/bin/ruff check recsvc tests model_repository benchmarks deploy

typecheck: setup
	.venv/bin/mypy recsvc

test: setup lint typecheck
	.venv/bin/python -m pytest -q -p no:cacheprovider

protos: setup
	PATH=.venv/bin:$$PATH ./scripts/gen_protos.sh

# The fault suite alone, its figures rendered into docs/RELIABILITY.md (RECSVC_SOAK_S=600 adds the soak run).
reliability: setup
	rm -rf var/reliability-run
	RECSVC_RELIABILITY_DIR=var/reliability-run .venv/bin/python -m pytest -q -p no:cacheprovider tests/faults
	.venv/bin/python scripts/reliability_report.py var/reliability-run --command "make reliability"
