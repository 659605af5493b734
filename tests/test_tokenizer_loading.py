"""The engine loads the tokenizer class AutoTokenizer would pick, without importing AutoTokenizer's auto-model
machinery (seconds of start-up: nanovllm/utils/loader.py, tokenizer_class)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from nanovllm.utils.loader import load_tokenizer

TEXT = "Hello <|im_end|> wörld\n  12 <|endoftext|>"


def with_tokenizer_class(model_dir: str, tmp_path, name: str | None) -> str:
    path = str(tmp_path / "tok")
    shutil.copytree(model_dir, path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    if name is None:
        config.pop("tokenizer_class", None)
    else:
        config["tokenizer_class"] = name
    with open(config_path, "w") as f:
        json.dump(config, f)
    return path


# None: no tokenizer_class; an unknown name: whatever AutoTokenizer falls back to, through AutoTokenizer itself
@pytest.mark.parametrize("name", ["as saved", "Qwen2Tokenizer", "PreTrainedTokenizerFast", None, "NoSuchTokenizer"])
def test_same_tokenizer_as_autotokenizer(qwen3_dir, tmp_path, name):
    path = qwen3_dir if name == "as saved" else with_tokenizer_class(qwen3_dir, tmp_path, name)
    ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(auto)
    ids = auto.encode(TEXT)
    assert ours.encode(TEXT) == ids and len(set(ids)) > 5
    assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_id == auto.eos_token_id is not None


def test_loading_skips_the_auto_model_imports(qwen3_dir):
    """In a fresh interpreter: loading the tokenizer imports neither the auto-model factory nor generation."""
    code = ("import sys; from nanovllm.utils.loader import load_tokenizer; tok = load_tokenizer(sys.argv[1]); "
            "assert tok.encode('hi'); heavy = [m for m in ('transformers.models.auto.auto_factory', "
            "'transformers.generation') if m in sys.modules]; assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code, qwen3_dir], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
