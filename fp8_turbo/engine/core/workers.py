"""Tensor-parallel workers: the engine's process is rank 0 and drives N-1 worker ranks in lockstep.

Start-up (`WorkerGroup.start`): ranks 1..N-1 are spawned (torch.multiprocessing, spawn) and all ranks
join a process group at MASTER_ADDR:MASTER_PORT (default 127.0.0.1 and a free port): a gloo group for
rank 0's messages and a model group for the layers' collectives (NCCL on CUDA, gloo on CPU). Rank 0
sends the EngineConfig; each rank builds its shard of the model, reading only its slices.

Then rank 0 talks to the workers over the gloo group, one broadcast per operation:
    step      the step's integers (HostStep: token ids, positions, slots, logits rows, block tables,
              lengths) in one int64 buffer of HEADER + payload; every rank runs the forward pass (the
              layers do the all-reduces), only rank 0 gets logits. A payload too big for the fixed
              buffer follows in a second broadcast (large prefills).
    call      a Worker method by name, with pickled arguments (start-up: KV calibration, KV allocation;
              `run`: any function of the model, LLMEngine.collective_rpc), run by every rank together and
              closed by a gather of the results.
    shutdown  workers leave their loop and exit.

Lifecycle: workers are daemonic children that also exit when rank 0 goes away (the next broadcast
fails, and a watchdog thread polls the parent pid). A worker that dies makes rank 0's next collective
fail (gloo: at once, "connection closed by peer"; NCCL: at the model group's timeout); rank 0 then
raises `WorkerCrashedError` naming the rank and its exit code, for this step and every later one, and
stops the other workers. `check()` polls the processes so /health reports a dead worker while idle.

Multi-node (untested here): set MASTER_ADDR/MASTER_PORT to rank 0's address, FP8_TURBO_LOCAL_RANKS to
the ranks rank 0's node runs, and start the others with `python -m fp8_turbo.engine.core.workers --rank R
--world-size N` on their nodes.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fp8_turbo.engine.core.engine_config import EngineConfig
from fp8_turbo.engine.core.model_runner import HostStep, ModelRunner, StepLogits
from fp8_turbo.engine.core.scheduler import ScheduledSeq
from fp8_turbo.engine.model.attention_metadata import AttentionMetadata
from fp8_turbo.engine.model.parallel import TensorParallel

logger = logging.getLogger("fp8_turbo")

HEADER = 8  # kind, payload length, T, B, logits rows, max blocks, max query len, max sequence len
CAPACITY = 4096  # int64 of the fixed message buffer: a decode step of dozens of sequences fits inline
STEP, CALL, SHUTDOWN = 1, 2, 3
CONTROL_TIMEOUT = datetime.timedelta(days=365)  # workers wait for rank 0's next message for as long as it takes
MODEL_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("FP8_TURBO_TP_TIMEOUT", "300")))


class TensorParallelError(RuntimeError):
    """The tensor-parallel group is out of step (a failed step, a dead worker): the engine cannot go on."""


class WorkerCrashedError(TensorParallelError):
    """A tensor-parallel worker process died."""


# ---------------------------------------------------------------------------------------- messages


def pack_step(host: HostStep) -> tuple[list[int], torch.Tensor]:
    """(header fields, int64 payload) of a step."""
    max_blocks = max(len(t) for t in host.block_tables)
    tables = [b for t in host.block_tables for b in t + [0] * (max_blocks - len(t))]
    payload = torch.tensor(host.input_ids + host.positions + host.slot_mapping + host.logits_indices + host.seq_lens
                           + host.cu_seqlens_q + tables, dtype=torch.int64)
    fields = [len(host.input_ids), len(host.seq_lens), len(host.logits_indices), max_blocks, host.max_query_len,
              host.max_seq_len]
    return fields, payload


def unpack_step(fields: list[int], payload: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, AttentionMetadata]:
    """Input ids and AttentionMetadata on `device` from a step message (one copy to the device)."""
    t, b, n, max_blocks, max_query_len, max_seq_len = fields[:6]
    payload = payload.to(device, non_blocking=True)
    ids, pos, slots, logits, lens, cu, tables = payload.split([t, t, t, n, b, b + 1, b * max_blocks])
    meta = AttentionMetadata(positions=pos, slot_mapping=slots, block_tables=tables.view(b, max_blocks).int(),
                             seq_lens=lens.int(), cu_seqlens_q=cu.int(), max_query_len=max_query_len,
                             logits_indices=logits, max_seq_len=max_seq_len)
    return ids, meta


class Channel:
    """Rank 0's messages to the workers: a fixed int64 buffer broadcast over the control group."""

    def __init__(self, group):
        self.group = group
        self.buf = torch.zeros(CAPACITY, dtype=torch.int64)

    def send(self, kind: int, fields: list[int] = (), payload: torch.Tensor | None = None) -> None:
        n = 0 if payload is None else payload.numel()
        self.buf[:HEADER] = 0
        self.buf[0], self.buf[1] = kind, n
        self.buf[2:2 + len(fields)] = torch.tensor(fields, dtype=torch.int64)
        inline = n <= CAPACITY - HEADER
        if n and inline:
            self.buf[HEADER:HEADER + n] = payload
        dist.broadcast(self.buf, src=0, group=self.group)
        if n and not inline:
            dist.broadcast(payload, src=0, group=self.group)

    def recv(self) -> tuple[int, list[int], torch.Tensor | None]:
        dist.broadcast(self.buf, src=0, group=self.group)
        kind, n = int(self.buf[0]), int(self.buf[1])
        fields = self.buf[2:HEADER].tolist()
        if not n:
            return kind, fields, None
        if n <= CAPACITY - HEADER:
            return kind, fields, self.buf[HEADER:HEADER + n].clone()
        payload = torch.empty(n, dtype=torch.int64)
        dist.broadcast(payload, src=0, group=self.group)
        return kind, fields, payload

    def send_object(self, obj: Any) -> None:
        dist.broadcast_object_list([obj], src=0, group=self.group)

    def recv_object(self) -> Any:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_objects(self, obj: Any, rank: int, size: int) -> list[Any] | None:
        out = [None] * size if rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out


# ---------------------------------------------------------------------------------------- every rank


def _threads_per_rank(size: int) -> int:
    env = os.environ.get("OMP_NUM_THREADS")
    return int(env) if env else max(1, (os.cpu_count() or 1) // size)


def init_distributed(rank: int, size: int, addr: str, port: int, device: torch.device) -> tuple[TensorParallel, Channel]:
    """Join the group; returns this rank's TensorParallel (model collectives) and the control channel."""
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size,
                            timeout=CONTROL_TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    model_group = dist.new_group(backend=backend, timeout=MODEL_TIMEOUT)
    return TensorParallel(rank, size, model_group), Channel(dist.group.WORLD)


def memory_report(model: torch.nn.Module) -> dict[str, int]:
    """This rank's weight bytes (parameters and buffers, shared storage once) and its process memory
    (VmHWM: peak resident set) — `engine.collective_rpc(memory_report)` gives every rank's."""
    seen, weights = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            weights += t.untyped_storage().nbytes()
    for m in model.modules():  # e4m3 weights kept beside a Linear's parameters
        for name in ("weight_fp8", "weight_scale"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                weights += t.untyped_storage().nbytes()
    report = {"weight_bytes": weights}
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    report[key] = int(value.split()[0]) * 1024
    return report


class Worker:
    """A worker rank's model shard and KV cache (rank 0's engine holds the same itself)."""

    def __init__(self, config: EngineConfig, tp: TensorParallel, device: torch.device):
        from fp8_turbo.engine.checkpoints.loader import build_model
        from fp8_turbo.engine.checkpoints.source import read_hf_config, resolve_model
        from fp8_turbo.engine.model.config import ModelConfig
        from fp8_turbo.engine.model.linear import QuantConfig

        self.config, self.device = config, device
        source = resolve_model(config.model)
        cfg = ModelConfig.from_hf_dict(read_hf_config(source))
        quant = QuantConfig(config.quantization, config.quantization_ignore, device)
        self.model = build_model(source, cfg, quant, device, config.torch_dtype(device), tp)
        self.model.set_deterministic(config.deterministic)  # as rank 0's engine does
        self.model.store_vocab_matrices(config.vocab_matrices_dtype(device, self.model.is_quantized))
        self.kv_caches: list = []

    # ---- calls (each one run by every rank together; see LLMEngine) ----------------------------
    def calibrate_kv(self, token_ids: list[int], block_size: int) -> None:
        from fp8_turbo.engine.core.kv_calibration import calibrate_kv_scales

        calibrate_kv_scales(self.model, token_ids, block_size)

    def allocate_kv(self, num_blocks: int, dtype: torch.dtype) -> None:
        from fp8_turbo.engine.core.kv_cache import allocate_kv_caches

        cfg = self.model.cfg
        self.kv_caches = allocate_kv_caches(cfg.num_layers, num_blocks, self.config.block_size, self.model.num_kv_heads,
                                            cfg.head_dim, dtype, self.device)

    def run(self, fn, *args) -> Any:
        """fn(this rank's model, *args): LLMEngine.collective_rpc (tests, benchmarks)."""
        return fn(self.model, *args)

    # ---- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def serve(self, channel: Channel) -> None:
        tp = self.model.tp
        while True:
            kind, fields, payload = channel.recv()
            if kind == STEP:
                input_ids, meta = unpack_step(fields, payload, self.device)
                self.model(input_ids, meta, self.kv_caches)
            elif kind == CALL:
                name, args = channel.recv_object()
                result = getattr(self, name)(*args)
                channel.gather_objects(result, tp.rank, tp.size)
            elif kind == SHUTDOWN:
                return
            else:
                raise TensorParallelError(f"rank {tp.rank}: unknown message kind {kind}")


def worker_main(rank: int, size: int, addr: str, port: int, device: str, parent_pid: int | None = None) -> None:
    """A worker rank's process: join, receive the config, build the shard, serve until shutdown."""
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s rank {rank} %(name)s: %(message)s")
    torch.set_num_threads(_threads_per_rank(size))
    if parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        tp, channel = init_distributed(rank, size, addr, port, dev)
        config = channel.recv_object()
        Worker(config, tp, dev).serve(channel)
    except BaseException:
        logger.exception("tensor-parallel worker %d failed", rank)
        code = 1
    else:
        code = 0
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # at once: no interpreter teardown (seconds on a busy machine), and a broken group stays broken


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


# ---------------------------------------------------------------------------------------- rank 0


class WorkerGroup:
    """Rank 0's side: the worker processes, the control channel, and this rank's TensorParallel."""

    def __init__(self, tp: TensorParallel, channel: Channel, procs: list[mp.Process]):
        self.tp, self.channel, self.procs = tp, channel, procs
        self.error: TensorParallelError | None = None
        self.closed = False

    @classmethod
    def start(cls, config: EngineConfig, device: torch.device) -> "WorkerGroup":
        size = config.tensor_parallel_size
        if dist.is_initialized():
            raise RuntimeError("this process already holds a torch.distributed group (another tensor-parallel "
                               "engine?): shut that engine down first (engine.shutdown())")
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT") or _free_port(addr))
        local = int(os.environ.get("FP8_TURBO_LOCAL_RANKS", size))
        if device.type == "cuda" and (device.index or 0) + min(local, size) > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={size} needs {min(local, size)} GPUs from {device} on, "
                             f"{torch.cuda.device_count()} visible")
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(_threads_per_rank(size))
        ctx = mp.get_context("spawn")
        procs = []
        for rank in range(1, min(local, size)):
            dev = f"cuda:{(device.index or 0) + rank}" if device.type == "cuda" else "cpu"
            p = ctx.Process(target=worker_main, args=(rank, size, addr, port, dev, os.getpid()), daemon=True,
                            name=f"fp8-turbo-tp{rank}")
            p.start()
            procs.append(p)
        try:
            tp, channel = init_distributed(0, size, addr, port, device)
            channel.send_object(config)
        except BaseException:
            for p in procs:
                p.kill()
            raise
        logger.info("tensor parallel: %d ranks (%s, %s:%d), worker pids %s", size, "nccl" if device.type == "cuda"
                    else "gloo", addr, port, [p.pid for p in procs])
        return cls(tp, channel, procs)

    @contextlib.contextmanager
    def call(self, name: str, *args: Any):
        """`with group.call("calibrate_kv", ids, bs) as results:` the workers run Worker.<name>(*args)
        while rank 0 runs its own part in the block; on exit `results` holds the workers' return values
        (index = rank; results[0] is None)."""
        self.check()
        results: list[Any] = []
        try:
            self.channel.send(CALL)
            self.channel.send_object((name, args))
            yield results
            results.extend(self.channel.gather_objects(None, 0, self.tp.size))
        except BaseException as e:
            raise self.failed(e) from e

    def send_step(self, host: HostStep) -> tuple[list[int], torch.Tensor]:
        fields, payload = pack_step(host)
        self.channel.send(STEP, fields, payload)
        return fields, payload

    def check(self) -> None:
        """Raise the group's error if it failed or a worker process has exited."""
        if self.error is None and not self.closed:
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                self.failed(None)
        if self.error is not None:
            raise self.error

    def failed(self, cause: BaseException | None) -> TensorParallelError:
        """Record that the group is broken (by `cause`, or a dead worker), stop the workers, return the error."""
        if self.error is None:
            deadline = time.monotonic() + 2.0  # a peer's socket closes before its exit code is in
            while time.monotonic() < deadline and not any(p.exitcode is not None for p in self.procs):
                time.sleep(0.02)
            dead = [(rank, p) for rank, p in enumerate(self.procs, start=1) if p.exitcode is not None]
            if dead:
                names = ", ".join(f"rank {r} (pid {p.pid}) exited with code {p.exitcode}" for r, p in dead)
                self.error = WorkerCrashedError(f"tensor-parallel worker died: {names}; the engine cannot run "
                                                f"requests any more (restart it)" + (f" [{cause!r}]" if cause else ""))
            else:
                self.error = TensorParallelError(f"tensor-parallel rank 0 failed and the workers are out of step; "
                                                 f"the engine cannot run requests any more: {cause!r}")
            logger.error("%s", self.error)
            self._stop_workers()
        return self.error

    def shutdown(self) -> None:
        """Stop the workers (politely when the group is healthy) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        if self.error is None:
            with contextlib.suppress(Exception):
                self.channel.send(SHUTDOWN)
        self._stop_workers()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    def _stop_workers(self) -> None:
        for p in self.procs:
            p.join(timeout=10 if self.error is None else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)


class ParallelModelRunner(ModelRunner):
    """Rank 0's runner: each step's inputs go to the workers first, then every rank runs the forward."""

    def __init__(self, model, kv_caches, block_size: int, device: torch.device, workers: WorkerGroup):
        super().__init__(model, kv_caches, block_size, device)
        self.workers = workers

    def prepare(self, batch: list[ScheduledSeq]):
        host = self.host_step(batch)
        fields, payload = self.workers.send_step(host)
        input_ids, meta = unpack_step(fields, payload, self.device)
        return input_ids, meta, host.prompt_rows

    def run(self, batch: list[ScheduledSeq]) -> StepLogits:
        self.workers.check()
        try:
            return super().run(batch)
        except Exception as e:
            raise self.workers.failed(e) from e


def collective_timing(model: torch.nn.Module, on: bool) -> dict[str, float]:
    """Turn this rank's collective timing on/off; returns (and resets) what was timed so far."""
    tp = model.tp
    out = {"collective_seconds": tp.collective_seconds, "collective_calls": tp.collective_calls}
    tp.timing, tp.collective_seconds, tp.collective_calls = on, 0.0, 0
    return out


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """A worker rank started by hand (another node): joins rank 0 at MASTER_ADDR:MASTER_PORT."""
    p = argparse.ArgumentParser(prog="python -m fp8_turbo.engine.core.workers", description=main.__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True, help="the engine's tensor_parallel_size")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    args = p.parse_args(argv)
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        p.error("set MASTER_ADDR and MASTER_PORT to rank 0's address and port")
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    worker_main(args.rank, args.world_size, addr, int(port), device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
