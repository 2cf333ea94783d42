.PHONY: install test check bench dev

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

dev: install
	.venv/bin/conveyor dev

bench: install
	scripts/services
	for b in bench/*.py; do echo "== $$b"; .venv/bin/python $$b || exit 1; done
