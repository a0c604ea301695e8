# The README's two commands: `make up` (set up, train, publish, start Triton + server, demo query)
# and `make test` (set up, lint, type-check, run the whole suite). .ci/run calls `make test`.
.PHONY: setup up test lint typecheck protos

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
