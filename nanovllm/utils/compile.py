import functools

import torch


def compile_on_cuda(fn):
    """torch.compile `fn` for CUDA tensors only: on CPU it stays eager (compiling there costs seconds and buys little)."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(self, x, *args, **kwargs):
        nonlocal compiled
        if not x.is_cuda:
            return fn(self, x, *args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(self, x, *args, **kwargs)
    return wrapper
