"""Run Triton kernel checks on a GPU when there is one, else under Triton's CPU interpreter in a worker process.

Triton fixes "interpret or compile" when `triton` is first imported and when each kernel is decorated, reading
TRITON_INTERPRET at those moments, so the interpreter cannot be switched on for part of a process that may
already hold a compiled-flavoured triton. Without CUDA the checks therefore run in one worker process spawned
with TRITON_INTERPRET=1 (it imports triton afresh); this process never sets the variable. With CUDA, or inside
that worker, they run in-process. The worker ends with the test module that started it (tests/conftest.py).
"""
import multiprocessing
import os
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
WORKER_TIMEOUT_S = 300
_pool = None


def _call(check, args):
    try:
        return True, check(*args)
    except Exception:
        return False, traceback.format_exc()


def run_check(check, *args):
    """check(*args) here, or in the interpreter worker on a machine without CUDA; `check` must be a module-level
    function (it is pickled by name) and args and result picklable. A failure there fails the calling test."""
    global _pool
    if CUDA or INTERPRETING:
        return check(*args)
    if _pool is None:
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"        # only for the child's environment, restored at once
        try:
            _pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            _pool.submit(os.getpid).result()        # starts the worker while the variable is set
        finally:
            if before is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = before
    try:
        ok, result = _pool.submit(_call, check, args).result(timeout=WORKER_TIMEOUT_S)
    except BrokenProcessPool:
        _pool = None
        pytest.fail("the TRITON_INTERPRET=1 worker died (an out-of-bounds access in a kernel?)", pytrace=False)
    if not ok:
        pytest.fail(f"in the TRITON_INTERPRET=1 worker:\n{result}", pytrace=False)
    return result


def stop_worker():
    global _pool
    if _pool is not None:
        _pool.shutdown(cancel_futures=True)
        _pool = None
