"""Triton kernels compiled ahead of start-up's first launches, many at a time.

With an empty Triton cache, start-up used to compile its ~40 kernels one by one at their first launch (each: Triton's
passes, ptxas and, on Triton 3.6, gcc building its launcher), most of a cold LLM(). Here the warm-up first runs as a
*discovery* pass: every Triton launch is skipped, and Triton's AsyncCompileMode hands each new kernel to a thread pool
(the heavy parts, subprocesses and C++ passes, do not hold the GIL); leaving the pass waits for them all, so the real
warm-up that follows finds every kernel compiled and loaded.

The skipped launches leave their outputs unwritten, so a discovery pass may only depend on shapes, never on values:
true of our kernel wrappers, which CUDA graphs capture for the same reason. Torch's own ops still run (so the pass also
warms them up), and the CUDA RNG is restored afterwards. NANOVLLM_COMPILE_AHEAD=0 turns this off; without CUDA or
Triton's async compile, or after any failure, kernels compile at their first launch as before.
"""
import os
import threading
import warnings

import torch

_local = threading.local()      # skipping is per thread: another engine may be starting up, launching for real
_patch_lock = threading.Lock()
_patch_users = 0


def enabled(device: torch.device) -> bool:
    return (device.type == "cuda" and os.environ.get("NANOVLLM_COMPILE_AHEAD", "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1")


def hash_triton_install_in_background(device: torch.device) -> threading.Thread | None:
    """Start Triton's hash of its own install on a thread. Every kernel's cache key includes it, so the first kernel
    of a process waits for it even when the disk cache holds every kernel; it reads and hashes Triton's ~0.5 GB
    library, which releases the GIL, so done now it overlaps loading the weights instead."""
    if not enabled(device):
        return None
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        try:
            from triton.compiler.compiler import triton_key
        except ImportError:
            return None
    thread = threading.Thread(target=triton_key, name="triton-key", daemon=True)
    thread.start()
    return thread


def compile_ahead(device: torch.device, *passes) -> bool:
    """Run the callables `passes` as a discovery pass (Triton launches skipped, their kernels compiled in parallel)
    and wait for the compiles. Returns whether it all ran: False when disabled or after a failure (then warned)."""
    if not enabled(device):
        return False
    try:
        from concurrent.futures import ThreadPoolExecutor

        import triton
        from triton.runtime.jit import JITFunction
        mode_class = triton.AsyncCompileMode     # Triton 3.5+
    except (ImportError, AttributeError):
        return False

    class LoadingCompileMode(mode_class):
        def submit(self, key, compile_fn, *rest):
            # Load the module and build the launcher (gcc, on Triton 3.6) on the pool too, not at the first launch.
            return super().submit(key, lambda: _loaded(compile_fn()), *rest)

    index = device.index if device.index is not None else torch.cuda.current_device()
    rng = torch.cuda.get_rng_state(index)
    # The pool's threads load modules onto the engine's device (a tensor-parallel rank's is not device 0).
    pool = ThreadPoolExecutor(os.cpu_count() or 4, initializer=torch.cuda.set_device, initargs=(index,))
    _install_skipping_run(JITFunction)
    try:
        with LoadingCompileMode(pool):      # its exit waits for the compiles, after launches are real again
            _local.seen = set()
            try:
                for discover in passes:
                    discover()
            finally:
                _local.seen = None
        return True
    except Exception as e:      # never worse than the plain path: the real warm-up compiles what is missing
        warnings.warn(f"compiling Triton kernels ahead failed ({type(e).__name__}: {e}); they compile one by one "
                      f"at their first launch instead (NANOVLLM_COMPILE_AHEAD=0 skips trying)")
        return False
    finally:
        _uninstall_skipping_run(JITFunction)
        pool.shutdown(wait=True, cancel_futures=True)
        torch.cuda.set_rng_state(rng, index)   # the discovery pass's draws leave no trace in the user's RNG


def _specialization(fn, args, kwargs) -> tuple:
    """What selects one compiled kernel of `fn` (or more, never less): constexpr and option values, tensors' dtypes
    and 16-byte alignment, and the classes Triton specializes integers into (1, multiples of 16, 64-bit)."""
    bound = dict(zip((p.name for p in fn.params), args)) | kwargs
    specialized = {p.name for p in fn.params if not p.is_constexpr}    # (launch options are values: num_warps...)

    def of(name, value):
        if isinstance(value, torch.Tensor):
            return value.dtype, value.data_ptr() % 16 == 0
        if isinstance(value, int) and not isinstance(value, bool) and name in specialized:
            return value == 1, value % 16 == 0, abs(value) >= 2**31
        return repr(value)
    return fn, tuple((name, of(name, value)) for name, value in sorted(bound.items()))


def _loaded(kernel):
    kernel._init_handles()
    return kernel


def _install_skipping_run(cls):
    """Swap JITFunction.run for one that turns a launch into Triton's `warmup` (compile, no launch) while this thread
    discovers; reference-counted, so that engines starting up in several threads put back the original once."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            real_run = cls.run

            def run(self, *args, grid, warmup, **kwargs):
                seen = getattr(_local, "seen", None)
                if seen is None or warmup:
                    return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
                # Triton hashes the kernel's source again at every launch of a pending compile: a launch that can
                # only need a kernel already submitted is skipped before that (most of the graph sizes' launches).
                key = _specialization(self, args, kwargs)
                if key not in seen:
                    seen.add(key)
                    return real_run(self, *args, grid=grid, warmup=True, **kwargs)
            run.real_run = real_run
            cls.run = run
        _patch_users += 1


def _uninstall_skipping_run(cls):
    global _patch_users
    with _patch_lock:
        _patch_users -= 1
        if _patch_users == 0:
            cls.run = cls.run.real_run
