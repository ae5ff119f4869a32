"""Helpers of tests/test_tensor_parallel.py. The functions taking a model run on every rank through
`engine.collective_rpc` (the workers import this module: spawn hands them the test's sys.path).

Per-layer comparison without compounding ("substitution"): TP=1 records the input and output of every
Linear in call order; then every TP=N rank replaces each Linear's input by TP=1's (its columns for a
row-parallel layer), so each layer computes from exactly TP=1's values and its output can be checked
against the rounding bound of that layer alone. Hooks are nn.Module hooks on Linear, so this holds
whatever kernel a Linear calls inside.
"""
from __future__ import annotations

import torch

from fp8_turbo.engine.model.linear import Linear
from fp8_turbo.engine.model.parallel import RowParallelLinear
from fp8_turbo.kernels.fp8 import dequantize_fp8
from fp8_turbo.kernels.quantize import fake_quantize_fp8

U = 2.0 ** -24  # fp32 unit roundoff


def linears(model) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear)]


def record(model, run) -> list[dict]:
    """Inputs and outputs of every Linear call while run() executes, in call order."""
    calls: list[dict] = []

    def hook(m, args, out):
        calls.append(dict(name=m.name, x=args[0].detach().float().clone(), y=out.detach().float().clone()))

    handles = [m.register_forward_hook(hook) for m in linears(model)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def substitute(model, recording: list[dict]) -> None:
    """Install on this rank: each Linear call takes TP=1's recorded input (its columns when the layer is
    row-parallel); outputs are kept in model._tp_outputs. Undone by `unsubstitute`."""
    state = dict(i=0, outputs=[])

    def pre(m, args):
        r = recording[state["i"]]
        assert r["name"] == m.name, (state["i"], r["name"], m.name)
        x = r["x"]
        if isinstance(m, RowParallelLinear):
            x = x[..., m.in_start:m.in_start + m.in_features].contiguous()
        return (x.to(args[0].dtype),) + tuple(args[1:])

    def post(m, args, out):
        state["outputs"].append(out.detach().float().clone())
        state["i"] += 1

    model._tp_hooks = [h for m in linears(model) for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    model._tp_outputs = state["outputs"]


def unsubstitute(model) -> list[torch.Tensor]:
    for h in model._tp_hooks:
        h.remove()
    return model._tp_outputs


def dequantized_weights(model) -> dict[str, torch.Tensor]:
    """Every Linear's weight as this rank computes with it (e4m3 x scale for FP8 layers), fp32."""
    out = {}
    for m in linears(model):
        if m.weight_fp8 is not None:
            out[m.name] = dequantize_fp8(m.weight_fp8, m.weight_scale).cpu()
        else:
            out[m.name] = m.weight.detach().float().cpu()
    return out


def summation_bound(m: Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |y_a - y_b| for two fp32 evaluations of y = xq @ W.T in different summation
    orders: each is within gamma_K * (|xq| @ |W|.T) of the exact value (Higham, Accuracy and Stability of
    Numerical Algorithms, Lemma 3.1 / eq. 3.5), so together 2 gamma_K. xq: x as the layer quantizes it."""
    act = m.act_granularity
    xq = fake_quantize_fp8(x, act) if act is not None else x.float()
    k = x.shape[-1]
    gamma = k * U / (1 - k * U)
    return 2 * gamma * (xq.abs() @ weight.abs().T)


def ulp_response(model, run, ulps: int, seed: int) -> torch.Tensor:
    """run()'s result with every row-parallel output moved by `ulps` ulps (random signs): the size of
    the perturbation an all-reduce's summation order makes (see the test module's docstring)."""
    g = torch.Generator().manual_seed(seed)

    def hook(m, args, out):
        away = torch.where(torch.rand(out.shape, generator=g) < 0.5, -torch.inf, torch.inf).to(out.dtype)
        for _ in range(ulps):
            out = torch.nextafter(out, away)
        return out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, RowParallelLinear)]
    try:
        return run()
    finally:
        for h in handles:
            h.remove()
