from nanovllm.sampling_params import SamplingParams


class Detokenizer:
    """Incremental detokenization of one request's completion, cut at its stop strings.

    A multi-byte UTF-8 character, or a byte-level BPE merge, can span tokens. So, as in vLLM, each update decodes
    a short window `token_ids[prefix_offset:]` and takes the text past the decode of the part already emitted,
    `token_ids[prefix_offset:read_offset]`, holding back text that ends in U+FFFD (an incomplete character). The
    window then starts one emission back, at a character boundary, so the pieces concatenate to the whole decode
    and decoders that look at context (SentencePiece's leading space) get it."""

    def __init__(self, tokenizer, params: SamplingParams, every_step: bool):
        self.tokenizer, self.stop, self.include_stop = tokenizer, params.stop, params.include_stop_str_in_output
        self.skip_special_tokens = params.skip_special_tokens
        self.every_step = every_step    # streamed or stop strings: update each step, else once at the end
        # Streaming holds back a tail that could be the start of a stop string, which may yet be cut.
        self.hold_back = 0 if self.include_stop or not self.stop else max(map(len, self.stop)) - 1
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.num_streamed = 0           # characters of `text` already handed out by `new_text`

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def update(self, token_ids: list[int], final: bool, check_stop: bool = True) -> str | None:
        """Bring `text` up to date with the completion `token_ids` (the whole list, grown since the last
        call). `final` emits held-back text too. Returns the stop string when one now ends the text."""
        emitted = self._decode(token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(token_ids[self.prefix_offset:])
        if not final and (len(window) <= len(emitted) or window.endswith("\ufffd")):
            return None
        start = len(self.text)
        self.text += window[len(emitted):]
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return self._cut_at_stop(start) if check_stop else None

    def _cut_at_stop(self, start: int) -> str | None:
        """Find the first stop string that ends in the text added at `start`, and cut the text there."""
        best, best_at = None, len(self.text)
        for stop in self.stop:
            at = self.text.find(stop, max(0, start - len(stop) + 1))
            if 0 <= at < best_at:
                best, best_at = stop, at
        if best is not None:
            self.text = self.text[:best_at + len(best) if self.include_stop else best_at]
        return best

    def new_text(self, finished: bool) -> str:
        """The text not handed out yet, less the held-back tail unless the request has finished."""
        end = len(self.text) if finished else max(self.num_streamed, len(self.text) - self.hold_back)
        piece, self.num_streamed = self.text[self.num_streamed:end], end
        return piece
