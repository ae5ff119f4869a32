"""quantize_fp8: the torch reference against an independent oracle (torch's own e4m3 cast), and the
Triton kernel (TRITON_INTERPRET=1) against the reference, bit for bit.

How the interpreter tests run: `@triton.jit` picks compiled or interpreted when a kernel module is
imported, so TRITON_INTERPRET must be set before `kernels` is imported, and pytest-xdist shares worker
processes between modules. The `interp_*` functions below are therefore not collected in the normal
run (pytest collects `test_*`); `test_triton_kernel_in_interpreter` runs them in a fresh
`python -m pytest` subprocess with TRITON_INTERPRET=1 and `-o python_functions=interp_*`. Nothing
leaks into other modules, and the kernels run unmodified.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fp8_turbo.kernels.backend import interpreting
from fp8_turbo.kernels.fp8 import E4M3_MAX, FP8_DTYPE, MIN_AMAX, dequantize_fp8
from fp8_turbo.kernels.quantize import fake_quantize_fp8, quantize_fp8, quantize_fp8_reference

REPO = Path(__file__).resolve().parents[1]


def run_interp_tests(test_file: str, timeout: int = 600) -> None:
    """Run the `interp_*` tests of test_file in a fresh process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "python_functions=interp_*", test_file]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout, proc.stdout[-2000:]


def test_triton_kernel_in_interpreter():
    run_interp_tests(__file__)


# ----------------------------------------------------------------------------------------------------
# reference (CPU, plain run)
# ----------------------------------------------------------------------------------------------------


def oracle(x: torch.Tensor, granularity: str, group_size: int = 128):
    """Independent spelling of the contract: torch's RNE cast after a clamp, per row / group / tensor."""
    x = x.reshape(-1, x.shape[-1]).float()
    m, k = x.shape
    if granularity == "tensor":
        scale = (x.abs().max().clamp(min=MIN_AMAX) / E4M3_MAX).reshape(1)
        s = scale.expand(m, k)
    elif granularity == "token":
        scale = x.abs().amax(1, keepdim=True).clamp(min=MIN_AMAX) / E4M3_MAX
        s = scale.expand(m, k)
    else:
        groups = [x[:, i:i + group_size] for i in range(0, k, group_size)]
        scale = torch.stack([g.abs().amax(1).clamp(min=MIN_AMAX) / E4M3_MAX for g in groups], 1)
        s = torch.cat([scale[:, j:j + 1].expand(-1, g.shape[1]) for j, g in enumerate(groups)], 1)
    q = (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def assert_same_fp8(q, expect):
    bad = q.view(torch.uint8) != expect.view(torch.uint8)
    assert not bad.any(), f"{bad.sum()} of {bad.numel()} differ: {q[bad][:5].float()} vs {expect[bad][:5].float()}"


@pytest.mark.parametrize("granularity", ["token", "tensor", "group"])
@pytest.mark.parametrize("group_size", [128, 100])
def test_reference_matches_oracle(granularity, group_size):
    torch.manual_seed(1)
    x = torch.randn(37, 333) * torch.logspace(-5, 4, 37)[:, None]
    x[3] = 0.0  # all-zero row
    x[5, :4] = torch.tensor([2.0**-20, -1e-9, 1e3, 0.0])
    q, scale = quantize_fp8(x, granularity, group_size)
    q_o, scale_o = oracle(x, granularity, group_size)
    assert torch.equal(scale, scale_o)
    assert_same_fp8(q, q_o)
    assert torch.isfinite(scale).all() and (scale > 0).all()


def test_shapes_dtypes_and_leading_dims():
    x = torch.randn(2, 3, 300, dtype=torch.bfloat16)
    for granularity, scale_shape in [("token", (2, 3, 1)), ("group", (2, 3, 3)), ("tensor", (1,))]:
        q, scale = quantize_fp8(x, granularity)
        assert q.shape == x.shape and q.dtype == FP8_DTYPE
        assert tuple(scale.shape) == scale_shape and scale.dtype == torch.float32
        q2, scale2 = quantize_fp8(x.reshape(6, 300), granularity)
        assert_same_fp8(q.reshape(6, 300), q2)


def test_static_scale_saturates_and_zero_row():
    x = torch.tensor([[1.0, 500.0, -1e6, 448.0, 2.0**-10], [0.0] * 5])
    q, scale = quantize_fp8(x, "tensor", scale=torch.tensor(1.0))
    assert scale.item() == 1.0
    assert torch.equal(q.float(), torch.tensor([[1.0, 448.0, -448.0, 448.0, 0.0], [0.0] * 5]))
    q, scale = quantize_fp8(torch.zeros(4, 64), "token")
    assert torch.isfinite(scale).all() and (q.float() == 0).all()


def test_fake_quantize_equals_dequantized_quantize():
    torch.manual_seed(2)
    x = torch.randn(9, 200) * 7
    for granularity in ("token", "tensor", "group"):
        for group_size in (128, 64):
            q, scale = quantize_fp8(x, granularity, group_size)
            assert torch.equal(fake_quantize_fp8(x, granularity, group_size), dequantize_fp8(q, scale, group_size))
    s = torch.tensor([0.05])
    q, _ = quantize_fp8(x, "tensor", scale=s)
    assert torch.equal(fake_quantize_fp8(x, "tensor", scale=s), q.float() * s)


def test_argument_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="granularity"):
        quantize_fp8(x, "row")
    with pytest.raises(ValueError, match="static scale"):
        quantize_fp8(x, "token", scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="dtype"):
        quantize_fp8(x.double())


# ----------------------------------------------------------------------------------------------------
# Triton kernel in the interpreter (collected only by the subprocess above, as interp_*)
# ----------------------------------------------------------------------------------------------------

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None)


def interp_dispatches_to_triton():
    assert interpreting(), "interp_* tests must run with TRITON_INTERPRET=1"
    import fp8_turbo.kernels.quantize as mod
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(mod._quantize_row_kernel, InterpretedFunction)


@SETTINGS
@given(
    m=st.integers(1, 300),
    k=st.integers(1, 700),
    granularity=st.sampled_from(["token", "tensor", "group"]),
    group_size=st.sampled_from([128, 64, 96]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    log_mag=st.integers(-8, 6),
    seed=st.integers(0, 2**16),
)
def interp_kernel_matches_reference(m, k, granularity, group_size, dtype, log_mag, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 10.0**log_mag).to(dtype)
    x[torch.rand(m, generator=g) < 0.1] = 0  # some all-zero rows
    q, scale = quantize_fp8(x, granularity, group_size)  # Triton (interpreted)
    q_ref, scale_ref = quantize_fp8_reference(x.reshape(m, k), granularity, group_size, None)
    assert torch.equal(scale.reshape(scale_ref.shape), scale_ref)
    assert_same_fp8(q, q_ref)


def edge_matrix() -> torch.Tensor:
    """[rows, 256]: e4m3 grid values, ties, +-448, values above 464, subnormals, an all-zero row."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[grid.isfinite()].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    extra = torch.tensor([448.0, -448.0, 464.0, -464.0, 465.0, 1e4, -3e38, 2.0**-9, 2.0**-10,
                          3 * 2.0**-11, -(2.0**-12), 1e-30])
    vals = torch.cat([grid, mid, torch.nextafter(mid, grid[1:]), torch.nextafter(mid, grid[:-1]), extra])
    vals = torch.cat([vals, torch.zeros(-vals.numel() % 256)]).view(-1, 256)
    return torch.cat([vals, torch.zeros(1, 256)])


def interp_edge_values_static_scale():
    # scale 1: the kernel rounds the raw values, so every tie, saturation and subnormal is exercised
    x = edge_matrix()
    for scale in (torch.tensor([1.0]), torch.tensor([0.37])):
        q, _ = quantize_fp8(x * scale, "tensor", scale=scale)
        q_ref, _ = quantize_fp8_reference(x * scale, "tensor", 128, scale)
        assert_same_fp8(q, q_ref)
    q, _ = quantize_fp8(x, "tensor", scale=torch.tensor([1.0]))
    assert q.float().abs().max() == 448.0 and not q.float().isnan().any()


@pytest.mark.parametrize("granularity", ["token", "group", "tensor"])
def interp_edge_values_dynamic(granularity):
    x = edge_matrix()
    q, scale = quantize_fp8(x, granularity, 64)
    q_ref, scale_ref = quantize_fp8_reference(x, granularity, 64, None)
    assert torch.equal(scale, scale_ref) and torch.isfinite(scale).all()
    assert_same_fp8(q, q_ref)
    assert (q[-1].float() == 0).all()  # the all-zero row
