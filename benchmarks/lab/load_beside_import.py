"""Copying a checkpoint's tensors into CUDA parameters alone and beside a thread that imports transformers (as the
tokenizer's thread does at start-up): one copy per tensor, or all of them in one `torch._foreach_copy_`. Shows how
much of the GIL the import takes from a loop of short CUDA calls.

    PYTHONPATH=. python benchmarks/lab/load_beside_import.py DIR each|foreach [--beside]
"""
import argparse
import glob
import threading
import time

import torch
from safetensors import safe_open

p = argparse.ArgumentParser()
p.add_argument("model", help="a checkpoint directory (its *.safetensors and tokenizer files)")
p.add_argument("mode", choices=["each", "foreach"])
p.add_argument("--beside", action="store_true", help="import transformers and load the tokenizer on a thread")
args = p.parse_args()

files = [safe_open(f, "pt", "cpu") for f in sorted(glob.glob(f"{args.model}/*.safetensors"))]
names = [(f, name) for f in files for name in f.keys()]
targets = [torch.empty(f.get_slice(n).get_shape(), dtype=torch.bfloat16, device="cuda") for f, n in names]
torch.cuda.synchronize()


def import_and_load_tokenizer():
    from nanovllm.utils.loader import tokenizer_class     # the class the engine's tokenizer thread imports and loads
    tokenizer_class(args.model).from_pretrained(args.model)


thread = threading.Thread(target=import_and_load_tokenizer)
start = time.perf_counter()
if args.beside:
    thread.start()
if args.mode == "each":
    for target, (f, name) in zip(targets, names):
        target.copy_(f.get_tensor(name))
else:
    torch._foreach_copy_(targets, [f.get_tensor(name) for f, name in names])
torch.cuda.synchronize()
loaded = time.perf_counter() - start
if args.beside:
    thread.join()
print(f"{args.mode} {'beside the import' if args.beside else 'alone'}: load {loaded:.2f} s, "
      f"import and tokenizer done at {time.perf_counter() - start:.2f} s")
