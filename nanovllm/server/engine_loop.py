"""The server's engine loop: the one thread that calls the engine, so the engine needs no lock for the server.

HTTP handlers (on the asyncio thread) validate a request, turn it into Sequences and `submit` them with an
asyncio.Queue, their sink; `abort` takes them back. The loop adds what was submitted, steps the engine, and hands
every request the Deltas its sequences got: one `call_soon_threadsafe` per hand-over for all requests, one queue
put per request, so the cost per token is one small tuple. A streamed sequence gets a Delta each step it got
a token; any other, one Delta when it finishes, with all its text and token ids.

Deltas are handed over once the next step is launched, while this thread waits for the GPU: the HTTP thread
formats and sends them then, instead of contending for the GIL with the launch (every torch call releases the GIL,
and taking it back from a busy thread waits for Python's switch interval). The next hand-over waits until the HTTP
thread has sent the last one and then for as long again (it holds the GIL at most half the time): under load a
stream gets one chunk for several tokens, so Python's cost per token falls as the load rises instead of the engine
slowing down; a lone stream still gets a chunk per step."""
import asyncio
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Callable, NamedTuple

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import Sequence


class Delta(NamedTuple):
    """What one sequence (the choice `index` of its request) got since its last Delta."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None     # one {token_id: logprob} per new token, when asked for
    finish_reason: str | None                   # set on a sequence's last Delta


class EngineDead(Exception):
    """Put in a request's sink (instead of a list of Deltas) when the engine loop died; the message says why."""


@dataclass(slots=True)
class _Tracked:
    sink: asyncio.Queue
    index: int
    stream: bool
    num_sent: int = 0       # completion tokens handed out
    num_logprobs_sent: int = 0


class EngineLoop:
    """Owns `engine`: `run` (on the thread that created the engine) is its only caller once serving starts."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.scheduler = engine.scheduler
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()   # from the asyncio thread: see submit and abort
        self._tracked: dict[Sequence, _Tracked] = {}
        self._unposted: dict[asyncio.Queue, list[Delta]] = {}  # Deltas not handed over yet: see the module's docstring
        self._sending = False       # the HTTP thread has Deltas of the last hand-over still to send
        self._next_post_at = 0.0    # perf_counter time before which the next hand-over waits
        self._aloop: asyncio.AbstractEventLoop | None = None
        self.dead: str | None = None        # why the engine loop stopped stepping (an exception), once it did
        # Counters for /metrics, written by the loop only.
        self.num_finished = self.num_aborted = self.num_prompt_tokens = self.num_generation_tokens = 0

    # ---- the asyncio thread's side ------------------------------------------------------------------------

    def attach(self, aloop: asyncio.AbstractEventLoop):
        """The event loop the sinks belong to (the server's, once it has started)."""
        self._aloop = aloop

    def submit(self, requests: list[list[Sequence]], stream: bool) -> asyncio.Queue:
        """Queue validated requests, each a prompt's samples (Sequence.fork: the first carries the others, which the
        scheduler queues right behind it); their sequences are the choices 0, 1, ... Returns the sink their Deltas
        go to."""
        sink = asyncio.Queue()
        self._inbox.put((requests, sink, stream))
        return sink

    def abort(self, seqs: list[Sequence]):
        """Take sequences back (the client went away): the loop aborts those not finished and frees their blocks."""
        self._inbox.put((seqs, None, None))

    @property
    def num_tracked(self) -> int:
        """Sequences the loop serves (queued in the engine, running, or finished but not handed out)."""
        return len(self._tracked)

    # ---- the engine thread's side ---------------------------------------------------------------------------

    def run(self, stop: Callable[[], bool]):
        """Step the engine while there is work, until `stop()`; then abort whatever is left."""
        while not stop():
            busy = self.dead is None and not self.scheduler.is_finished()
            if not busy:
                self._post_unposted(wait_for_http=False)
            self._take_inbox(wait=not busy)
            if self.dead is None and not self.scheduler.is_finished():
                self._step()
        self._post_unposted(wait_for_http=False)
        self._abort(list(self._tracked))

    def _take_inbox(self, wait: bool):
        """Add and abort what the handlers sent; when idle, wait a little for something to come."""
        try:
            item = self._inbox.get(timeout=0.1) if wait else self._inbox.get_nowait()
            while True:
                what, sink, stream = item
                if sink is None:
                    self._abort(what)
                elif self.dead is not None:
                    self._post({sink: EngineDead(self.dead)})
                else:
                    index = 0
                    for samples in what:
                        for seq in samples:
                            self._tracked[seq] = _Tracked(sink, index, stream)
                            index += 1
                    self.engine._queue([samples[0] for samples in what])
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _abort(self, seqs: list[Sequence]):
        """Stop tracking `seqs`; the engine ends those not finished and frees their blocks."""
        mine = [seq for seq in seqs if self._tracked.pop(seq, None) is not None and not seq.is_finished]
        self.num_aborted += len(mine)
        self.engine._abort(mine)

    def _step(self):
        try:
            # The sequences that got a token, finished ones included.
            advanced = self.engine._step(on_launched=self._post_unposted)[0]
        except Exception as e:      # the engine cannot go on (a dead worker, a CUDA error): fail every request
            traceback.print_exc()
            self.dead = f"the engine stopped: {type(e).__name__}: {e}"
            self._post_unposted(wait_for_http=False)
            self._post({track.sink: EngineDead(self.dead) for track in self._tracked.values()})
            self._tracked.clear()
            return
        out = self._unposted
        for seq in advanced:
            track = self._tracked.get(seq)
            finished = seq.is_finished
            if track is None or not (finished or track.stream):
                continue
            num_prompt, num_tokens = seq.num_prompt_tokens, seq.num_completion_tokens
            token_ids = seq.token_ids[num_prompt + track.num_sent:num_prompt + num_tokens]
            track.num_sent = num_tokens
            logprobs = None
            if seq.logprobs is not None:
                logprobs, track.num_logprobs_sent = seq.logprobs[track.num_logprobs_sent:], len(seq.logprobs)
            text = seq.detokenizer.new_text(finished) if seq.detokenizer is not None else ""
            out.setdefault(track.sink, []).append(
                Delta(track.index, text, token_ids, logprobs, seq.finish_reason if finished else None))
            if finished:
                del self._tracked[seq]
                self.num_finished += 1
                self.num_prompt_tokens += num_prompt
                self.num_generation_tokens += num_tokens

    def _post_unposted(self, wait_for_http: bool = True):
        """Hand over the Deltas gathered since the last hand-over, unless the HTTP thread is still sending those
        (`wait_for_http`): then they wait for a later step, and a stream gets one chunk for several tokens."""
        if self._unposted and not (wait_for_http and (self._sending or time.perf_counter() < self._next_post_at)):
            self._sending = True    # before the hand-over: the HTTP thread may be done with it before _post returns
            if not self._post(self._unposted):
                self._sending = False
            self._unposted = {}

    def _sent(self, start: float):
        """On the HTTP thread, after the streams woken by a hand-over have run (they were scheduled first). The next
        hand-over waits as long as this one took: the HTTP thread holds the GIL at most half the time."""
        now = time.perf_counter()
        self._next_post_at = now + (now - start)
        self._sending = False

    def _deliver(self, out: dict):
        start = time.perf_counter()
        for sink, item in out.items():
            sink.put_nowait(item)
        self._aloop.call_soon(self._sent, start)

    def _post(self, out: dict) -> bool:
        """Hand each sink its item, in one wake-up of the event loop. Returns whether it was handed over."""
        if self._aloop is not None and not self._aloop.is_closed():
            try:
                self._aloop.call_soon_threadsafe(self._deliver, out)
                return True
            except RuntimeError:    # the event loop closed meanwhile: nobody is left to tell
                pass
        return False
