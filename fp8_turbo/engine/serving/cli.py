"""The `fp8-turbo` command line (also `python -m fp8_turbo`)."""
from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
import time
from pathlib import Path

from fp8_turbo.engine.model.linear import QUANT_SCHEMES
from fp8_turbo.engine.model.model import VOCAB_DTYPES
from fp8_turbo.engine.checkpoints.source import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model id, HF checkpoint dir or .gguf file (default {DEFAULT_MODEL})")
    p.add_argument("--quantization", default="fp8", choices=QUANT_SCHEMES,
                   help="weight/activation scheme (default fp8: W8A8 on FP8 GPUs, weight-only FP8 on CPU; "
                        "fp8-w8a8 names W8A8 on every backend)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the model over N processes (N GPUs on CUDA; gloo on CPU)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: run decode without CUDA graphs")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant kernels: a seeded request gives the same tokens whatever runs beside it")
    p.add_argument("--kv-cache-memory", type=memory_size, default=None, metavar="SIZE",
                   help="KV cache budget per rank, e.g. 256MiB, 2GB or bytes (default: 1 GiB on CPU, the memory plan on CUDA)")
    p.add_argument("--lm-head-dtype", default="auto", choices=("auto", *VOCAB_DTYPES),
                   help="how the embedding and a high-precision lm_head are stored (auto: bfloat16 for FP8 on CPU)")
    p.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help="exact speculative decoding, vLLM's JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 3, "
                        "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' (default: off)")


def speculative_config(text: str):
    """--speculative-config's JSON -> SpeculativeConfig (argparse type; a bad value is a usage error)."""
    from fp8_turbo.engine.core.spec_decode import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def memory_size(text: str) -> int:
    """'256MiB', '1.5GB', '1g', '1048576' -> bytes (argparse type; a bad value is a usage error)."""
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected bytes or a number with KiB/MiB/GiB/KB/MB/GB")
    return int(value * _UNITS[unit])


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)


def _make_llm(args):
    from fp8_turbo.engine.llm import LLM

    return LLM(args.model, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, device=args.device,
               max_model_len=args.max_model_len, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
               enforce_eager=args.enforce_eager, deterministic=args.deterministic,
               kv_cache_memory_bytes=args.kv_cache_memory, lm_head_dtype=args.lm_head_dtype,
               speculative_config=args.speculative_config)


def _params(args):
    from fp8_turbo.engine.sampling.params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens)


def cmd_generate(args) -> int:
    llm = _make_llm(args)
    t0 = time.perf_counter()
    out = llm.generate([args.prompt], _params(args))[0]
    dt = time.perf_counter() - t0
    print(out.outputs[0].text)
    n = len(out.outputs[0].token_ids)
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s, finish_reason={out.outputs[0].finish_reason}]", file=sys.stderr)
    return 0


def stream_chat(llm, messages: list[dict], params, write) -> str:
    """Generate the assistant's reply to `messages`, calling write(delta) as text arrives."""
    engine = llm.engine
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    request_id = f"chat-{time.monotonic_ns()}"
    engine.add_request(request_id, ids, params)
    shown = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                write(text[len(shown):])
                shown = text
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        write("\n[interrupted]")
    return shown


def cmd_chat(args) -> int:
    llm = _make_llm(args)
    params = _params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"fp8-turbo chat: {args.model} ({args.quantization}). /reset clears the conversation, /exit quits.")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            messages = list(system)
            print("[conversation cleared]")
            continue
        messages.append({"role": "user", "content": line})

        def write(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        reply = stream_chat(llm, messages, params, write)
        print()
        messages.append({"role": "assistant", "content": reply})


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port right now, or None when it can. Checked before the
    model loads (seconds to minutes), so a taken port fails at once and names the address."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not 0 <= port <= 65535:
        return f"--port {port}: must be in 0..65535"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"--host {host!r}: cannot resolve it ({e.strerror})"
    for family, kind, proto, _, sockaddr in infos:  # uvicorn listens on every address the host resolves to
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
            try:
                s.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return (f"{address} is already in use (another server?): stop it, or pick another port "
                            f"with --port (make run PORT=...)")
                return f"cannot listen on {address}: {e.strerror}"
    return None


def cmd_serve(args) -> int:
    problem = listen_problem(args.host, args.port)
    if problem:
        print(f"fp8-turbo serve: {problem}", file=sys.stderr)
        return 1
    from fp8_turbo.engine.serving.server import run_server

    return run_server(args)


def cmd_plan(args) -> int:
    import torch

    from fp8_turbo.engine.checkpoints.fp8 import detect
    from fp8_turbo.engine.checkpoints.source import read_hf_config, resolve_model
    from fp8_turbo.engine.core.memory_plan import plan_memory
    from fp8_turbo.engine.model.config import ModelConfig
    from fp8_turbo.engine.model.linear import QuantConfig

    source = resolve_model(args.model)
    hf = read_hf_config(source)
    cfg = ModelConfig.from_hf_dict(hf)
    quant = QuantConfig(args.quantization)
    spec = detect(hf, cfg) if source.kind == "hf" else None
    if spec is not None:  # a pre-quantized checkpoint decides its own scheme
        quant = spec.quant_config(quant)
    dtype = getattr(torch, args.dtype)
    plan = plan_memory(cfg, quant, gpu_bytes=int(args.gpu_memory_gb * 1e9), utilization=args.gpu_memory_utilization,
                       dtype=dtype, kv_dtype=torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else dtype,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len)
    print(f"{args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {quant.scheme}, KV {args.kv_cache_dtype}")
    print(plan.table())
    return 0


def cmd_export_tokenizer(args) -> int:
    """Write the model's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json, ...), for
    tools that load a tokenizer by path, e.g. lm-evaluation-harness's `tokenizer=`. A GGUF model's
    tokenizer is rebuilt from the file's vocabulary by transformers, as the engine itself does."""
    from fp8_turbo.engine.checkpoints.source import resolve_model
    from fp8_turbo.tokenizer import load_tokenizer
    from fp8_turbo.tokenizer.chat_template import LLAMA3_CHAT_TEMPLATE

    tokenizer = load_tokenizer(resolve_model(args.model).path)
    if not tokenizer.hf.chat_template:  # the engine renders chats with its built-in template then
        tokenizer.hf.chat_template = LLAMA3_CHAT_TEMPLATE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.hf.save_pretrained(str(out))
    print(f"wrote the tokenizer of {args.model} to {out}")
    return 0


BENCHMARKS = ("generate", "throughput", "serve", "gemm", "attention", "sampler", "accuracy", "tp", "speculative")


def cmd_bench(args) -> int:
    """Run bench/<name>.py of the source checkout with the remaining arguments."""
    import runpy

    script = Path(__file__).resolve().parents[3] / "bench" / f"{args.name}.py"  # <checkout>/bench
    if not script.is_file():
        print(f"{script} not found: the benchmarks live in the source checkout (pip install -e .)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8-turbo", description="FP8 inference engine for Llama-family models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt and print the text")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=64)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that streams tokens as they come")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=256)
    p.add_argument("--system", default=None, help="an optional system message")
    p.set_defaults(func=cmd_chat)

    try:  # the wire protocol needs pydantic, which some machines lack (the GPU image): only serve needs it
        from fp8_turbo.engine.serving.limits import add_limit_args
        from fp8_turbo.engine.serving.protocol import API_KEY_ENV, DEFAULT_PRICE_INPUT_PER_M, DEFAULT_PRICE_OUTPUT_PER_M
    except ImportError:
        API_KEY_ENV, DEFAULT_PRICE_INPUT_PER_M, DEFAULT_PRICE_OUTPUT_PER_M = "FP8_TURBO_API_KEY", None, None
        add_limit_args = None

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, completions, models, metrics)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1 (or set {API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--no-web-ui", dest="web_ui", action="store_false",
                   help="do not serve the chat page at / (the API is unchanged)")
    p.add_argument("--price-input", type=float, default=DEFAULT_PRICE_INPUT_PER_M,
                   help="USD per million prompt tokens, for usage.estimated_cost")
    p.add_argument("--price-output", type=float, default=DEFAULT_PRICE_OUTPUT_PER_M,
                   help="USD per million generated tokens, for usage.estimated_cost")
    if add_limit_args is not None:
        add_limit_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("plan", help="memory plan: weights, activation peak, KV tokens, concurrent sequences")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint dir (config.json is enough), .gguf or model id")
    p.add_argument("--quantization", default="fp8", choices=QUANT_SCHEMES)
    p.add_argument("--kv-cache-dtype", default="fp8", choices=("auto", "fp8"))
    p.add_argument("--gpu-memory-gb", type=float, default=141.0, help="the GPU's memory (default: H200, 141)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.set_defaults(func=cmd_plan)

    from fp8_turbo.engine.serving.cli_quant import add_commands  # quantize, eval

    add_commands(sub)

    p = sub.add_parser("export-tokenizer", help="write the model's tokenizer as Hugging Face files (for lm-eval's tokenizer=)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model id, HF checkpoint dir or .gguf file (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export_tokenizer)

    p = sub.add_parser("bench", help="run a benchmark of bench/ (prints a table, writes JSON + PNG to bench/out/)")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
