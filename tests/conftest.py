"""Test tiers (one command, `make test`, runs the CPU tiers; with CUDA the GPU tier runs too):

- plain tests: CPU reference, opcheck, compile, bad inputs, integrations (always run);
- ``@pytest.mark.interpret``: Triton kernels on CPU tensors; run only when TRITON_INTERPRET=1
  (the env var must be set before triton is imported, hence a second pytest process);
- ``@pytest.mark.gpu``: need CUDA; skipped cleanly without it;
- ``@pytest.mark.slow``: a subprocess smoke run of a script (tens of seconds); ``-m "not slow"``
  leaves them out.
"""
import os
import zlib

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a subprocess smoke run of a script (tens of seconds)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interp = pytest.mark.skip(reason="Triton interpreter tier: run with TRITON_INTERPRET=1")
    skip_plain = pytest.mark.skip(reason="interpreter run: only @pytest.mark.interpret tests")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)
        if INTERPRET and "interpret" not in item.keywords:
            item.add_marker(skip_plain)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test, stable across runs and processes (str hash() is salted per
    # process; crc32 is not), so a failure reproduces.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
