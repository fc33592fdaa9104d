PY ?= python
PYTEST ?= $(PY) -m pytest

.PHONY: test test-cpu test-interpret test-gpu check

# The test command (CPU tiers; on a GPU machine the gpu-marked tests run too).
test: test-cpu test-interpret

test-cpu:
	$(PYTEST) -q tests

test-interpret:
	TRITON_INTERPRET=1 $(PYTEST) -q -m interpret tests

check:
	$(PY) -m fused_dit_ops check
