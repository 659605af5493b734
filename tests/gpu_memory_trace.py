"""A pytest plugin for finding which test leaves GPU memory taken: after each test it collects garbage and appends
the test's id, PyTorch's allocated and reserved memory and the device's used memory to $GPU_MEMORY_TRACE
(default /tmp/gpu_memory_trace.log). Used on the GPU machine only:

    python -m pytest -p tests.gpu_memory_trace tests/...
"""
import gc
import os

import pytest
import torch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    gc.collect()
    free, total = torch.cuda.mem_get_info()
    gib = 2**30
    with open(os.environ.get("GPU_MEMORY_TRACE", "/tmp/gpu_memory_trace.log"), "a") as f:
        f.write(f"{item.nodeid} allocated {torch.cuda.memory_allocated() / gib:.2f} reserved "
                f"{torch.cuda.memory_reserved() / gib:.2f} device-used {(total - free) / gib:.2f} GiB\n")
