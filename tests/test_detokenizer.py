"""Incremental detokenization against the tokenizer's decode of the whole completion, on random token ids
(the tiny tokenizer's byte-level vocabulary splits Chinese and emoji over several tokens)."""
import pytest
from hypothesis import given, settings, strategies as st
from transformers import AutoTokenizer

from nanovllm.engine.detokenizer import Detokenizer
from nanovllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(qwen3_dir):
    return AutoTokenizer.from_pretrained(qwen3_dir)


token_lists = st.lists(st.integers(0, 383), min_size=1, max_size=30)


def feed(detokenizer: Detokenizer, token_ids: list[int]) -> tuple[list[str], str | None]:
    """Feed the tokens one at a time as the engine does; returns the streamed pieces and the stop found."""
    pieces = []
    for n in range(1, len(token_ids) + 1):
        final = n == len(token_ids)
        stop = detokenizer.update(token_ids[:n], final)
        pieces.append(detokenizer.new_text(final or stop is not None))
        if stop is not None:
            return pieces, stop
    return pieces, None


@settings(max_examples=150, deadline=None)
@given(token_ids=token_lists, skip=st.booleans())
def test_pieces_concatenate_to_the_whole_decode(tokenizer, token_ids, skip):
    detokenizer = Detokenizer(tokenizer, SamplingParams(skip_special_tokens=skip), every_step=True)
    pieces, _ = feed(detokenizer, token_ids)
    assert "".join(pieces) == detokenizer.text == tokenizer.decode(token_ids, skip_special_tokens=skip)


@settings(max_examples=150, deadline=None)
@given(token_ids=token_lists, data=st.data(), include=st.booleans())
def test_stop_string_cuts_at_its_first_occurrence(tokenizer, token_ids, data, include):
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    start = data.draw(st.integers(0, max(0, len(text) - 1)))
    stop = text[start:start + data.draw(st.integers(1, 4))]
    if not stop or "\ufffd" in stop:
        return
    params = SamplingParams(stop=["\x00never", stop], include_stop_str_in_output=include)
    detokenizer = Detokenizer(tokenizer, params, every_step=True)
    pieces, found = feed(detokenizer, token_ids)
    at = text.find(stop)
    assert found == stop
    assert detokenizer.text == text[:at + len(stop) if include else at] == "".join(pieces)


def test_pieces_never_end_in_a_split_character(tokenizer):
    text = "语言模型预测下一个词。 😀🚀"
    token_ids = tokenizer.encode(text)
    pieces, _ = feed(Detokenizer(tokenizer, SamplingParams(), every_step=True), token_ids)
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 1      # text came out before the end, not all at once
