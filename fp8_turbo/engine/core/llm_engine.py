"""The engine loop: add requests, then `step()` until done. Used synchronously by `LLM.generate` and
from a background task by the asyncio engine that serves streams.

One step: schedule -> model forward -> sample -> append tokens, detokenize, check stops -> outputs.
With speculative decoding (core/spec_decode.py) a sequence may keep several tokens in one step.
"""
from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable

import torch

from fp8_turbo.engine.model.config import ModelConfig
from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.kv_cache import BlockManager, allocate_kv_caches, kv_bytes_per_token
from fp8_turbo.engine.core.kv_calibration import CALIBRATION_TOKENS, calibrate_kv_scales, calibration_text
from fp8_turbo.engine.model.linear import QuantConfig
from fp8_turbo.engine.model.native_step import reserve_native_step
from fp8_turbo.engine.checkpoints.loader import build_model
from fp8_turbo.engine.checkpoints.source import read_hf_config, resolve_model
from fp8_turbo.engine.core.cuda_graphs import CudaGraphRunner
from fp8_turbo.engine.core.memory_plan import MemoryPlan
from fp8_turbo.engine.core.model_runner import ModelRunner
from fp8_turbo.engine.core.workers import ParallelModelRunner, WorkerGroup
from fp8_turbo.engine.model.parallel import check_tensor_parallel
from fp8_turbo.engine.core.outputs import RequestOutput
from fp8_turbo.engine.core.request import Request, logprob_dict
from fp8_turbo.engine.sampling.sampler import Sampler, SamplingRow, compute_logprobs
from fp8_turbo.engine.sampling.structured import StructuredOutputs
from fp8_turbo.engine.sampling.params import SamplingParams
from fp8_turbo.engine.core.scheduler import ScheduledSeq, Scheduler
from fp8_turbo.engine.core.spec_decode import Drafter, verification_rows
from fp8_turbo.engine.core.sequence import Sequence
from fp8_turbo.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger("fp8_turbo")

_CPU_KV_BUDGET = 1 << 30  # bytes


class PromptTooLongError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        t0 = time.perf_counter()
        self.source = resolve_model(config.model)
        self.model_config = ModelConfig.from_hf_dict(read_hf_config(self.source))
        self.device = config.torch_device()
        # Tensor parallelism: this process is rank 0 of the group and drives the workers
        # (fp8_turbo/engine/core/workers.py); every model-touching step below runs on all ranks together.
        self.workers: WorkerGroup | None = None
        if config.tensor_parallel_size > 1:
            check_tensor_parallel(self.model_config, config.tensor_parallel_size, config.quantization)  # fail fast
            self.workers = WorkerGroup.start(config, self.device)
            weakref.finalize(self, self.workers.shutdown)
        try:
            self._init(config, t0)
        except BaseException as e:
            if self.workers is not None:
                self.workers.failed(e)  # they may wait in a collective of the load: stop them now
            self.shutdown()
            raise

    def _init(self, config: EngineConfig, t0: float) -> None:
        self.tokenizer: Tokenizer = load_tokenizer(self.source.path)
        self.dtype = config.torch_dtype(self.device)
        quant = QuantConfig(config.quantization, config.quantization_ignore, self.device)
        self.model = build_model(self.source, self.model_config, quant, self.device, self.dtype,
                                 self.workers.tp if self.workers else None)
        self.quant_scheme = self.model.quant.scheme  # what runs: the backend's pick for "fp8", or the checkpoint's
        logger.info("quantization: %s", self.model.quant.describe())
        self.model.store_vocab_matrices(config.vocab_matrices_dtype(self.device, self.model.is_quantized))
        self.load_seconds = time.perf_counter() - t0

        cfg = self.model_config
        self.model.set_deterministic(config.deterministic)
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.kv_scale_source = None
        if self.kv_dtype == torch.float8_e4m3fn:
            ids = self.tokenizer.encode(calibration_text())[:CALIBRATION_TOKENS]
            with self._all_ranks("calibrate_kv", ids, config.block_size):
                calibrate_kv_scales(self.model, ids, config.block_size)
            self.kv_scale_source = f"calibrated on {len(ids)} tokens"
        num_kv_heads = self.model.num_kv_heads  # this rank's (tensor parallelism splits the cache by heads)
        per_token = kv_bytes_per_token(cfg.num_layers, num_kv_heads, cfg.head_dim, self.kv_dtype)
        self.memory_plan: MemoryPlan | None = None
        if self.device.type == "cuda" and self.workers is None:
            self.memory_plan = self._measure_memory(per_token)  # before allocating: reads free memory
            budget = config.kv_cache_memory_bytes or self.memory_plan.kv_bytes
        else:  # CPU, or tensor-parallel ranks (a profiling forward would need every rank)
            budget = self._kv_budget_bytes()
        num_blocks = max(1, budget // (per_token * config.block_size))
        self.kv_capacity_tokens = num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings,
                                 self.kv_capacity_tokens)
        with self._all_ranks("allocate_kv", num_blocks, self.kv_dtype):
            kv_caches = allocate_kv_caches(cfg.num_layers, num_blocks, config.block_size, num_kv_heads, cfg.head_dim,
                                           self.kv_dtype, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        spec = config.speculative_config
        self.drafter = Drafter(spec, self.max_model_len) if spec is not None else None
        self.scheduler = Scheduler(self.block_manager, max(config.max_num_batched_tokens, config.block_size),
                                   config.max_num_seqs, self.drafter)
        if self.workers is not None:
            self.runner = ParallelModelRunner(self.model, kv_caches, config.block_size, self.device, self.workers)
        else:
            self.runner = ModelRunner(self.model, kv_caches, config.block_size, self.device)
        if self.device.type == "cuda" and not config.enforce_eager and self.workers is None:
            self.runner.graphs = CudaGraphRunner(self.model, kv_caches, config.block_size,
                                                 min(self.max_model_len, config.max_seq_len_to_capture),
                                                 config.max_num_seqs, self.device,
                                                 max_bucket=config.max_graph_batch_size)
            self.runner.graphs.capture()
        self.step_workspace_bytes = 0  # the native CPU step's buffers once reserved (reserve_step_buffers)
        self.sampler = Sampler(seed=config.seed)
        self.structured = StructuredOutputs(self.tokenizer.hf, cfg.vocab_size,
                                            sorted(self.tokenizer.stop_token_ids))  # grammars, built on first use
        self.requests: dict[str, Request] = {}
        self.num_computed_tokens_total = 0  # tokens run through the model (prefix-cache hits excluded)
        self.num_steps = 0  # forward passes run by step()
        # Called by step() right before the model computes (once the batch is scheduled): the asyncio
        # engine hands the previous step's outputs to their streams there, so they are written while
        # this step computes instead of holding the GIL before it.
        self.on_forward: Callable[[], None] | None = None
        # Both capacities, so the effect of an FP8 cache is visible at start-up.
        self.kv_capacity_by_dtype = {
            str(dt).removeprefix("torch."): budget // kv_bytes_per_token(cfg.num_layers, num_kv_heads, cfg.head_dim, dt)
            for dt in (self.dtype, torch.float8_e4m3fn)
        }
        logger.info("loaded %s (%s, %s) in %.1fs; KV cache %s: %d blocks x %d tokens = %d tokens (capacity by dtype: %s)%s",
                    config.model, self.quant_scheme, self.dtype, self.load_seconds, self.kv_dtype, num_blocks,
                    config.block_size, self.kv_capacity_tokens, self.kv_capacity_by_dtype,
                    f"; FP8 KV scales {self.kv_scale_source}" if self.kv_scale_source else "")
        if self.memory_plan is not None:
            logger.info("%s", self.memory_plan.table())

    def _all_ranks(self, name: str, *args):
        """Context in which rank 0 does its part of a start-up step while the workers run Worker.<name>(*args)
        (a no-op context without tensor parallelism)."""
        return self.workers.call(name, *args) if self.workers is not None else contextlib.nullcontext([])

    def collective_rpc(self, fn, *args) -> list:
        """[fn(model, *args) on each rank], rank order: every rank's model shard (one without tensor
        parallelism). `fn` must be picklable (a module-level function) to reach the workers."""
        with self._all_ranks("run", fn, *args) as results:
            mine = fn(self.model, *args)
        return [mine, *results[1:]]

    def check_health(self) -> None:
        """Raise when the engine cannot run requests any more (a tensor-parallel worker died)."""
        if self.workers is not None:
            self.workers.check()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op without them); the engine cannot step afterwards."""
        if self.workers is not None:
            self.workers.shutdown()

    def _kv_budget_bytes(self) -> int:
        """KV bytes without a measured plan: the CPU budget, or (tensor-parallel CUDA ranks) a share of
        the free memory after emptying torch's cache."""
        if self.config.kv_cache_memory_bytes:
            return self.config.kv_cache_memory_bytes
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * self.config.gpu_memory_utilization)
        return _CPU_KV_BUDGET

    def _measure_memory(self, kv_per_token: int) -> MemoryPlan:
        """CUDA: weights as allocated, the activation peak of a warm-up forward of max_num_batched_tokens
        tokens (as vLLM profiles), and what the device reports after torch's cache is emptied (the
        quantization temporaries of loading are returned first)."""
        cfg, config, dev = self.model_config, self.config, self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        weights = torch.cuda.memory_allocated(dev)
        tokens = max(config.max_num_batched_tokens, config.block_size)
        num_blocks = -(-tokens // config.block_size)
        caches = allocate_kv_caches(cfg.num_layers, num_blocks, config.block_size, cfg.num_kv_heads, cfg.head_dim,
                                    self.kv_dtype, dev)
        cache_bytes = torch.cuda.memory_allocated(dev) - weights
        seq = Sequence("memory-profile", 0, [0] * tokens, SamplingParams(max_tokens=1))
        seq.block_table = list(range(num_blocks))
        ModelRunner(self.model, caches, config.block_size, dev).run([ScheduledSeq(seq, tokens)])
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - weights - cache_bytes
        # the sampler's full-vocabulary fp32 temporaries for a batch of max_num_seqs rows
        peak += config.max_num_seqs * cfg.vocab_size * 4 * 4
        del caches
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        graphs = 0 if config.enforce_eager else 256 << 20
        return MemoryPlan(gpu_bytes=total, utilization=config.gpu_memory_utilization, weight_bytes=weights,
                          activation_bytes=peak, reserved_bytes=(total - free) - weights + graphs,
                          kv_bytes_per_token=kv_per_token, block_size=config.block_size,
                          max_model_len=min(config.max_model_len or cfg.max_position_embeddings,
                                            cfg.max_position_embeddings),
                          measured=True)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(prompt_token_ids, params)
        grammar = self.structured.compile(params.structured_outputs) if params.structured_outputs else None
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, prompt_token_ids, params)
            seq.grammar = grammar.matcher() if grammar is not None else None
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs.append(None)  # the first prompt token has no prediction
            seqs.append(seq)
        self.requests[request_id] = Request(request_id, prompt, list(prompt_token_ids), params, seqs, self.tokenizer)
        for seq in seqs:
            self.scheduler.add(seq)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (PromptTooLongError for lengths, GrammarError for a structured-output spec
        that does not compile) when a request cannot run; changes nothing but the grammar cache."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{name} has token ids {outside[:5]} outside the vocabulary [0, {vocab})")
        n_prompt = len(prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {n_prompt} tokens, but max_model_len is {self.max_model_len} "
                                     f"(at least one token must fit after the prompt)")
        # A max_tokens above what the context leaves is clamped to it (the sequence ends with finish_reason
        # "length" when the context is full: _append_token), as the served API promises for max_tokens up
        # to 1,000,000. min_tokens is a promise of tokens, so it must fit.
        if params.min_tokens and n_prompt + params.min_tokens > self.max_model_len:
            raise PromptTooLongError(f"the prompt has {n_prompt} tokens and min_tokens is {params.min_tokens}: "
                                     f"{n_prompt + params.min_tokens} tokens exceed max_model_len {self.max_model_len}")
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (no-op for unknown or finished ids)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        request.aborted = True
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort", None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @torch.inference_mode()
    def sequence_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of `token_ids`, [len, vocab] fp32, from one prefill through the
        paged cache (for scoring and accuracy studies; runs outside the scheduler, between steps)."""
        self.check_request(token_ids, SamplingParams(max_tokens=0))
        seq = Sequence("sequence-logits", 0, token_ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
        seq.prompt_logprobs.append(None)
        if not self.block_manager.can_allocate(seq, len(token_ids)):
            raise RuntimeError(f"no room in the KV cache for {len(token_ids)} tokens: finish running requests first")
        self.block_manager.allocate(seq, len(token_ids))
        try:
            out = self.runner.run([ScheduledSeq(seq, len(token_ids))])
        finally:
            self.block_manager.free(seq)
        parts = [out.prompt_logits[seq.seq_id][1]] if len(token_ids) > 1 else []
        return torch.cat(parts + [out.sample_logits])

    def reserve_step_buffers(self) -> int:
        """Take the native CPU step's buffers for the largest step (the token budget over the whole
        context) now and write them, so a server's memory is what it is at start-up rather than growing
        on its first large step (80 MiB on SmolLM2 at 2048 tokens). Without this (the library default)
        they grow to the largest step seen. Returns their bytes (0 off the native step)."""
        if self.device.type == "cpu":
            budget = max(self.config.max_num_batched_tokens, self.config.block_size)
            self.step_workspace_bytes = reserve_native_step(self.model, budget, self.max_model_len)
        return self.step_workspace_bytes

    def self_test(self) -> None:
        """Run one greedy token through the whole path (scheduler, forward, sampler) and raise what fails:
        a server checks it can compute before it says it is serving (and takes its step buffers:
        `reserve_step_buffers`). Leaves no request or block behind."""
        if self.requests:
            raise RuntimeError("self_test runs on an idle engine")
        self.reserve_step_buffers()
        request_id = "fp8-turbo-self-test"
        bos, computed = self.tokenizer.bos_token_id, self.num_computed_tokens_total
        self.add_request(request_id, [bos if bos is not None else 0], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        try:
            while request_id in self.requests:
                self.step()
        finally:
            self.abort_request(request_id)
            self.num_computed_tokens_total = computed  # not a user's token

    # ---- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that made progress (finished ones last time)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        if self.on_forward is not None:
            self.on_forward()
        step_logits = self.runner.run(batch.scheduled)
        self.num_steps += 1
        self.num_computed_tokens_total += batch.num_tokens

        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens  # accepted drafts are added below
            if not item.draft_token_ids:
                self.block_manager.cache_full_blocks(item.seq)

        for seq_id, (first, logits) in step_logits.prompt_logits.items():
            seq = next(i.seq for i in batch.scheduled if i.seq.seq_id == seq_id)
            self._record_prompt_logprobs(seq, first, logits)

        touched: dict[str, Request] = {}
        if step_logits.sample_seqs:
            rows: list[SamplingRow] = []
            forks = []  # grammar copies of the verification rows
            for item in step_logits.sample_seqs:
                seq_rows, seq_forks = verification_rows(item.seq, item.draft_token_ids, self._eos_ids(item.seq.params))
                rows += seq_rows
                forks += seq_forks
            try:
                sampled = self.sampler(step_logits.sample_logits, rows)
            finally:
                for fork in forks:
                    fork.close()
            token_ids = sampled.token_ids.tolist()
            now = time.monotonic()
            first = 0  # the item's first row
            for item in step_logits.sample_seqs:
                seq, drafts = item.seq, item.draft_token_ids
                request = self.requests[seq.request_id]
                accepted = self._keep_tokens(request, seq, drafts, token_ids, sampled.logprobs, first)
                first += 1 + len(drafts)
                if drafts:
                    self.drafter.observe(seq, len(drafts), accepted)
                    if not seq.is_finished:  # the accepted drafts' KV is the sequence's; the rest is dropped
                        seq.num_computed_tokens += accepted
                        self.block_manager.trim(seq)
                        self.block_manager.cache_full_blocks(seq)
                if seq.is_finished:
                    request.texts[seq.index].flush()
                request.first_token_time = request.first_token_time or now
                request.last_token_time = now
                touched[seq.request_id] = request

        outputs = []
        for request in touched.values():
            outputs.append(request.to_output())
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _keep_tokens(self, request: Request, seq: Sequence, drafts: list[int], token_ids: list[int],
                     logprobs: list, first: int) -> int:
        """Append the tokens sampled at rows first, first + 1, ... of one sequence: each row's token is
        kept, and the next row considered, while it equals that position's draft (and the sequence has
        not finished); the first that differs, or the one after the last draft, is kept and ends it.
        Returns how many drafts were accepted."""
        j = 0
        while True:
            token, lp = token_ids[first + j], logprobs[first + j]
            if lp is not None:
                seq.logprobs.append(logprob_dict([lp.token_id] + lp.top_ids, [lp.logprob] + lp.top_logprobs,
                                                 [lp.rank] + list(range(1, len(lp.top_ids) + 1)), self.tokenizer))
            if seq.params.max_tokens == 0:  # prompt-only request (prompt logprobs, echo)
                self._finish(seq, "length", None)
            else:
                self._append_token(request, seq, token)
            matched = j < len(drafts) and token == drafts[j]
            if seq.is_finished or not matched:
                return j + matched
            j += 1

    def _eos_ids(self, params: SamplingParams) -> list[int]:
        return [] if params.ignore_eos else sorted(self.tokenizer.stop_token_ids)

    def _append_token(self, request: Request, seq: Sequence, token: int) -> None:
        params = seq.params
        seq.output_token_ids.append(token)
        text = request.texts[seq.index]
        if seq.grammar is not None and not seq.grammar.accept(token):
            # The grammar failed (a limit reached at this step) or refused the token: the sequence ends
            # with finish_reason "error" and says why, never as a quiet "stop".
            grammar, n = seq.grammar, len(seq.output_token_ids) - 1
            seq.error = f"the grammar failed after {n} tokens: {grammar.error or f'token {token} was refused'}"
            logger.error("request %s choice %d: %s (%s)", seq.request_id, seq.index, seq.error,
                         grammar.grammar.excerpt if grammar.grammar is not None else "?")
            self._finish(seq, "error", None)
            return
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.tokenizer.stop_token_ids):
            if len(seq.output_token_ids) >= params.min_tokens:
                self._finish(seq, "stop", token)
                return
        stop = text.add(token)
        if stop is not None:
            self._finish(seq, "stop", stop)
        elif seq.grammar is not None and seq.grammar.finished:
            self._finish(seq, "stop", None)  # complete: only EOS could follow, so skip the step that samples it
        elif params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens:
            self._finish(seq, "length", None)
        elif seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.draft_state = None
        self.scheduler.finish(seq)
        if seq.grammar is not None:
            seq.grammar.close()
            seq.grammar = None

    def _record_prompt_logprobs(self, seq: Sequence, first: int, logits: torch.Tensor) -> None:
        targets = torch.tensor(seq.prompt_token_ids[first:first + logits.shape[0]], device=logits.device)
        k = seq.params.prompt_logprobs
        token_lp, token_rank, top_ids, top_lps = compute_logprobs(logits, targets, k)
        for r in range(logits.shape[0]):
            ids = [int(targets[r])] + top_ids[r, :k].tolist()
            lps = [float(token_lp[r])] + top_lps[r, :k].tolist()
            ranks = [int(token_rank[r])] + list(range(1, k + 1))
            seq.prompt_logprobs.append(logprob_dict(ids, lps, ranks, self.tokenizer))
