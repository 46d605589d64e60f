# make demo  - install everything (first time only) and run the main job on the tiny preset
# make test  - install everything (first time only) and run the test suite (notebooks included)
# make lab   - open JupyterLab on notebooks/
PYTHON ?= python3
STAMP := .make/installed

.PHONY: setup demo test lab bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"
	@mkdir -p .make && touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m ivl3lab.demo

test: $(STAMP)
	$(PYTHON) -m pytest -q

lab: $(STAMP)
	$(PYTHON) -m jupyter lab notebooks/

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_inference.py --preset tiny --device cpu

clean:
	rm -rf .make build *.egg-info .pytest_cache
