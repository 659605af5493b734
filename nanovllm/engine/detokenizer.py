from tokenizers.decoders import DecodeStream

from nanovllm.sampling_params import SamplingParams


class Detokenizer:
    """Incremental detokenization of one request's completion, cut at its stop strings.

    Streamed (or stop-checked) text grows a token at a time through the tokenizers library's DecodeStream, which
    emits text once the tokens so far make whole characters (a multi-byte UTF-8 character or a byte-level merge
    can span tokens) and gives decoders that look at context (SentencePiece's leading space) their context. The
    final text is one decode of the whole completion, which the streamed text is a prefix of: it adds what the
    stream still held back (an incomplete character at the end, decoded as U+FFFD)."""

    def __init__(self, tokenizer, params: SamplingParams, every_step: bool):
        self.tokenizer, self.stop, self.include_stop = tokenizer, params.stop, params.include_stop_str_in_output
        self.skip_special_tokens = params.skip_special_tokens
        self.every_step = every_step    # streamed or stop strings: update each step, else once at the end
        # Streaming holds back a tail that could be the start of a stop string, which may yet be cut.
        self.hold_back = 0 if self.include_stop or not self.stop else max(map(len, self.stop)) - 1
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens) if every_step else None
        self.num_fed = 0                # tokens fed to the stream
        self.text = ""
        self.num_streamed = 0           # characters of `text` already handed out by `new_text`

    def update(self, token_ids: list[int], final: bool, check_stop: bool = True) -> str | None:
        """Bring `text` up to date with the completion `token_ids` (the whole list, grown since the last
        call). `final` emits held-back text too. Returns the stop string when one now ends the text."""
        start = len(self.text)
        if final:
            whole = self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                          clean_up_tokenization_spaces=False)
            if whole.startswith(self.text):
                self.text = whole
        else:
            backend = self.tokenizer.backend_tokenizer
            for token_id in token_ids[self.num_fed:]:
                self.text += self.stream.step(backend, token_id) or ""
            self.num_fed = len(token_ids)
        return self._cut_at_stop(start) if check_stop and len(self.text) > start else None

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
