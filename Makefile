# `make run` starts the default model (HOST=, PORT=, MODEL=, QUANT= override); `make test` runs the
# suite. Both set up .venv on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= smollm2-135m-instruct
QUANT  ?= fp8
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: run test chat bench lock clean

$(STAMP): pyproject.toml requirements.lock scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m fp8_turbo serve --model $(MODEL) --quantization $(QUANT) --host $(HOST) --port $(PORT)

chat: $(STAMP)
	$(PY) -m fp8_turbo chat --model $(MODEL) --quantization $(QUANT)

# One torch thread per xdist worker: two workers with two threads each on two cores thrash.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP)
	$(PY) bench/generate.py

# Today's releases within pyproject's ranges into requirements.lock; run `make test` before committing it.
lock:
	bash scripts/lock.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
