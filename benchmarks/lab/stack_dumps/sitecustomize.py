"""Put this folder first on PYTHONPATH to make every Python process (tensor-parallel workers too, which are
spawned fresh) print all its threads' stacks on SIGUSR1: how benchmarks/lab/tp_check.sh sees where a hang sits.
Only for those checks; the package never imports it."""
import faulthandler
import os
import signal
import sys

faulthandler.register(signal.SIGUSR1, all_threads=True)

# Keep whatever sitecustomize the interpreter would have found without this folder.
_here = os.path.dirname(os.path.abspath(__file__))
for _path in sys.path:
    _other = os.path.join(_path or ".", "sitecustomize.py")
    if os.path.abspath(_path or ".") != _here and os.path.isfile(_other):
        exec(compile(open(_other).read(), _other, "exec"))
        break
