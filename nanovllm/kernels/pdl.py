"""Programmatic dependent launch (PDL, Hopper and later): a kernel may start while the one before it finishes.

At batch 1 a decode step is ~200 kernels of a few microseconds each, and each pays its launch and ramp while
the GPU's memory idles. Launched with PDL, a kernel's programs start as soon as every program of the kernel before
it has called `launch_dependents` (ours do at their start); they can then read what no kernel of the forward
writes (weights, tables, calibrated scales, and the step's positions and cache slots, which are in place before the
forward's first kernel, the embedding, starts: it is launched without PDL) and must call `wait_for_inputs` before
reading anything else, or writing anything. That wait returns once the kernel before has completed and its writes
are visible, and since that kernel waited for its own predecessor, everything launched earlier is complete too.
Kernels of torch or cuBLAS in between are launched without PDL and simply run after their predecessor, as always.

Every kernel launched with `launch_kwargs(...)` must call `wait_for_inputs(PDL)` before its first dependent read.
"""
import functools
import os

import torch
import triton
import triton.language as tl

try:    # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache
def _supported(device_index: int) -> bool:
    return (gdc_wait is not None and os.environ.get("NANOVLLM_PDL", "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(device_index)[0] >= 9)


def launch_kwargs(device: torch.device) -> dict:
    """The keyword arguments that launch one of our kernels with PDL where the GPU has it (sm_90+), else without.
    NANOVLLM_PDL=0 turns it off (to measure what it buys)."""
    if device.type == "cuda" and _supported(device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next kernel's programs start (once all of this kernel's programs have called it)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Block until the kernel before has completed and its writes are visible: before any read of what earlier
    kernels wrote, and before any write."""
    if PDL:
        gdc_wait()
