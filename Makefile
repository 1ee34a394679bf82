# The two commands of the README: `make demo` and `make test`. Both set up .venv/ on their own (idempotent).
PY := .venv/bin/python

.PHONY: venv demo test clean-data

venv:
	@bash tools/setup_env.sh

demo: venv
	@$(PY) tools/demo.py

test: venv
	@$(PY) -m pytest tests -q

clean-data:
	rm -rf data/toy_coco work_dirs/toy_demo
