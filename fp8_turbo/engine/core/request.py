"""A request: its prompt, its n sequences, their text, and when each of them stops."""
from __future__ import annotations

import time

from fp8_turbo.engine.core.outputs import CompletionOutput, Logprob, RequestOutput
from fp8_turbo.engine.sampling.params import SamplingParams
from fp8_turbo.engine.core.sequence import Sequence
from fp8_turbo.tokenizer import IncrementalDetokenizer, Tokenizer


class SequenceText:
    """Incremental text of one sequence, with stop strings checked across token boundaries.

    The last `len(longest stop string) - 1` characters are held back from `visible` while running,
    so a stream never shows the beginning of a stop string that is cut off later.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens)
        self.stop_strings = params.stop_strings
        self.include_stop = params.include_stop_str_in_output
        self.hold_back = max((len(s) for s in self.stop_strings), default=1) - 1
        self.text = ""
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> str | None:
        """Append a token's text; returns the stop string if one now appears (text is cut there)."""
        delta = self.detokenizer.add(token_id)
        if not delta or not self.stop_strings:
            self.text += delta
            return None
        # Search only where a stop string could newly end: the delta plus the tail before it.
        search_from = max(0, len(self.text) - self.hold_back)
        self.text += delta
        best: tuple[int, str] | None = None
        for s in self.stop_strings:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.stopped_by = s
        return s

    def flush(self) -> None:
        """At the end of the sequence: append text held back for an unfinished character."""
        if self.stopped_by is None:
            self.text += self.detokenizer.flush()

    def visible(self, finished: bool) -> str:
        if finished or not self.hold_back:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold_back)]


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 seqs: list[Sequence], tokenizer: Tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = seqs
        self.texts = [SequenceText(tokenizer, prompt_token_ids, params) for _ in seqs]
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.aborted = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        outputs = []
        for seq, text in zip(self.seqs, self.texts):
            done = seq.is_finished
            logprobs = seq.logprobs if self.params.logprobs is not None else None
            cumulative = None
            if logprobs is not None:
                cumulative = sum(lp[tok].logprob for lp, tok in zip(logprobs, seq.output_token_ids))
            outputs.append(CompletionOutput(
                index=seq.index,
                text=text.visible(done),
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=cumulative,
                logprobs=list(logprobs) if logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                error=seq.error,
            ))
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None:
            prompt_logprobs = list(self.seqs[0].prompt_logprobs)
        metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                   "last_token_time": self.last_token_time}
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_token_ids), outputs, self.finished,
                             prompt_logprobs, self.seqs[0].num_cached_tokens, metrics)


def logprob_dict(token_ids: list[int], logprobs: list[float], ranks: list[int], tokenizer: Tokenizer) -> dict[int, Logprob]:
    """{token id: Logprob} for the chosen token (first) and its alternatives."""
    out: dict[int, Logprob] = {}
    for tid, lp, rank in zip(token_ids, logprobs, ranks):
        if tid not in out:
            out[tid] = Logprob(lp, rank, tokenizer.token_text(tid))
    return out
