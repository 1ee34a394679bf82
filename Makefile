# The two commands of the README: `make demo` and `make test`. Both set up .venv/ on their own (idempotent).
# `make compat` (not part of `make test`: it downloads torch) runs the layer, engine and checkpoint tests on the lowest
# and the newest supported torch and on 2.4.1, in venvs of their own (tools/compat_check.sh, results in docs/compat.md).
# `make compat COMPAT_TORCH="2.3.1 newest"` checks other torches.
PY := .venv/bin/python

.PHONY: venv demo test compat clean-data

venv:
	@bash tools/setup_env.sh

demo: venv
	@$(PY) tools/demo.py

test: venv
	@$(PY) -m pytest tests -q

compat:
	@bash tools/compat_check.sh $(COMPAT_TORCH)

clean-data:
	rm -rf data/toy_coco work_dirs/toy_demo
