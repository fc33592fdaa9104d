PY ?= python
PYTEST ?= $(PY) -m pytest

.PHONY: test test-cpu test-interpret test-gpu check

# The test command (CPU tiers; with CUDA the gpu-marked tests run too).
test: test-cpu test-interpret

test-cpu:
	$(PYTEST) -q tests

test-interpret:
	TRITON_INTERPRET=1 $(PYTEST) -q -m interpret tests

check:
	$(PY) -m fused_dit_ops check

# Optional SGLang tier: run `bash scripts/sglang_env.sh` first (creates .venv-sglang).
SGLANG_PY ?= .venv-sglang/bin/python
.PHONY: test-sglang
test-sglang:
	TORCH_COMPILE_DISABLE=1 PYTHONPATH=$(CURDIR) $(SGLANG_PY) -m pytest -q -p no:cacheprovider tests/sglang
