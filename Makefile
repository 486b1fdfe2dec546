# make validate: run the larger specs of specs/ and regenerate docs/validation.md and
# docs/figures/ (about 20 min on 2 cores; see validation/run.py --help).
PYTHON ?= python

.PHONY: validate validate-report test

validate:
	$(PYTHON) validation/run.py

# redraw the figures and the report from the stores of a previous 'make validate'
validate-report:
	$(PYTHON) validation/run.py --reuse

test:
	$(PYTHON) -m pytest -q
