import functools

import torch


def compile_on_cuda(fn):
    """torch.compile a pure tensor function for CUDA inputs; CPU inputs run it eagerly. Decorate free functions, not
    methods: on a method dynamo guards on `self`, and every layer instance would compile its own copy."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        nonlocal compiled
        if not x.is_cuda:
            return fn(x, *args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(x, *args, **kwargs)
    return wrapper
