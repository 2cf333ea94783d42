.PHONY: install test check bench

install: .venv/bin/conveyor

.venv/bin/conveyor: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -e ".[dev]"
	touch $@

test: install
	scripts/test

check: install
	scripts/check
