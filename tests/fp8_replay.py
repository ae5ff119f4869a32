"""Record the FP8 roundings of the Triton path, then replay them on the CPU path.

Why: the two paths sum in different fp32 orders, so an activation that sits on an e4m3 rounding
boundary can round to neighbouring codes on the two paths, and one such flip moves the logits far more
than summation order does. Seen on an AVX2-only AMD CPU: one element of layer 1's o_proj input sat on
the tie 7.75 (between the codes 7.5 and 8); the paths rounded it apart and the logits moved by 1.9e-4 of
their magnitude, where summation order alone gives 4e-7. Where boundaries fall depends on the CPU's
BLAS kernels, so no fixed tolerance on freely running paths holds on every machine.

So the comparison is split into what is exactly comparable and what is bounded:
- `Recorder` (Triton path, TRITON_INTERPRET=1) keeps, in call order, every activation quantization
  (input, e4m3 bytes, scale), every FP8 KV-cache write (k, v, stored bytes) and the KV scales.
- `Replayer` (CPU path) checks at each of the same calls that the torch reference quantizes the Triton
  path's own input to the same bytes and scale (exact: quantization is bit-exact given its input), and
  that the CPU path's input is within the summation-order tolerance of the Triton path's; then it
  continues with the Triton path's codes, so a boundary flip never compounds downstream.

Hook points: `kernels.quantize_fp8` and `kernels.write_kv` (Triton path), and
`kernels.quantize.fake_quantize_fp8` and `kernels.write_kv` (CPU path). If the model stops calling one
of them, `Replayer.finish` fails with the counts, instead of the comparison passing vacuously.
"""
from __future__ import annotations

import torch

from fp8_turbo import kernels
import fp8_turbo.kernels.quantize as kq
from fp8_turbo.kernels.fp8 import FP8_DTYPE, expand_scale
from fp8_turbo.kernels.kv_write import write_kv_reference


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """|got - want| <= tol * max|want|, elementwise (the normwise summation-order bound)."""
    err = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    mag = want.float().abs().max().item() if want.numel() else 0.0
    assert err <= tol * mag, f"{what}: max error {err:.3e} > {tol:.1e} x max magnitude {mag:.3e}"


def kv_scales(llm) -> list[tuple[float, float]]:
    return [(layer.self_attn.k_scale, layer.self_attn.v_scale) for layer in llm.engine.model.layers]


def _cache_rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return cache.view(-1, *cache.shape[2:])[slots]  # [T', KVH, D]


class Recorder:
    """Wraps the Triton path's quantize_fp8 and write_kv; `.quant` and `.kv` hold what they did."""

    def __init__(self) -> None:
        self.quant: list[dict] = []
        self.kv: list[dict] = []

    def install(self) -> None:
        real_quantize, real_write = kernels.quantize_fp8, kernels.write_kv

        def quantize_fp8(x, granularity="token", group_size=128, scale=None, pow2=False):
            q, s = real_quantize(x, granularity, group_size, scale, pow2)
            self.quant.append(dict(x=x.float().reshape(-1, x.shape[-1]).clone(), granularity=granularity,
                                   group_size=group_size, pow2=pow2,
                                   q=q.reshape(-1, x.shape[-1]).view(torch.uint8).clone(), scale=s.clone()))
            return q, s

        def write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
            real_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
            if k_cache.dtype == FP8_DTYPE:  # high-precision caches store k, v as they are
                keep = slot_mapping >= 0
                slots = slot_mapping[keep].long()
                self.kv.append(dict(k=k[keep].float().clone(), v=v[keep].float().clone(), k_scale=k_scale,
                                    v_scale=v_scale, k_bytes=_cache_rows(k_cache, slots).view(torch.uint8).clone(),
                                    v_bytes=_cache_rows(v_cache, slots).view(torch.uint8).clone()))

        kernels.quantize_fp8, kernels.write_kv = quantize_fp8, write_kv

    def state(self) -> dict:
        return dict(quant=self.quant, kv=self.kv)


class Replayer:
    """Wraps the CPU path's fake_quantize_fp8 and write_kv to check against, then use, a recording."""

    def __init__(self, recording: dict, tol: float) -> None:
        self.quant, self.kv, self.tol = recording["quant"], recording["kv"], tol
        self.num_quant = self.num_kv = 0

    def install(self) -> None:
        real_write = kernels.write_kv

        def fake_quantize_fp8(x, granularity="token", group_size=128, scale=None, pow2=False):
            i = self.num_quant
            assert i < len(self.quant), f"the CPU path quantizes more often than the Triton path ({len(self.quant)})"
            r = self.quant[i]
            self.num_quant += 1
            x2 = x.float().reshape(-1, x.shape[-1])
            where = f"activation quantization #{i} {tuple(x2.shape)} {granularity}"
            assert (x2.shape, granularity, group_size, pow2) == (r["x"].shape, r["granularity"], r["group_size"], r["pow2"]), (
                f"{where}: the Triton path had {tuple(r['x'].shape)} {r['granularity']} {r['group_size']} {r['pow2']}")
            # Exact: the reference rounds the Triton path's own input to the Triton path's bytes and scale.
            q_ref, s_ref = kq.quantize_fp8_reference(r["x"], granularity, group_size, scale, pow2)
            assert torch.equal(q_ref.view(torch.uint8), r["q"]), f"{where}: e4m3 bytes differ from the reference's"
            assert torch.equal(s_ref.reshape(-1), r["scale"].reshape(-1)), f"{where}: scales differ from the reference's"
            # Bounded: the two inputs differ only by the summation order of what computed them.
            assert_within(x2, r["x"], self.tol, f"{where}: CPU input vs Triton input")
            q = r["q"].view(FP8_DTYPE).float()
            return (q * expand_scale(s_ref, *q.shape, group_size)).reshape(x.shape)

        def write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
            real_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
            if k_cache.dtype != FP8_DTYPE:
                return
            i = self.num_kv
            assert i < len(self.kv), f"the CPU path writes an FP8 cache more often than the Triton path ({len(self.kv)})"
            r = self.kv[i]
            self.num_kv += 1
            where = f"FP8 KV write #{i}"
            assert (k_scale, v_scale) == (r["k_scale"], r["v_scale"]), f"{where}: scales {(k_scale, v_scale)} vs {(r['k_scale'], r['v_scale'])}"
            keep = slot_mapping >= 0
            slots = slot_mapping[keep].long()
            t, kvh, d = r["k"].shape
            scratch = [torch.empty(1, t, kvh, d, dtype=FP8_DTYPE) for _ in range(2)]
            write_kv_reference(r["k"], r["v"], *scratch, torch.arange(t, dtype=torch.int32), k_scale, v_scale)
            for name, new, cache, ref in (("k", k, k_cache, scratch[0]), ("v", v, v_cache, scratch[1])):
                assert torch.equal(ref[0].view(torch.uint8), r[f"{name}_bytes"]), f"{where}: {name} bytes differ from the reference's"
                assert_within(new[keep], r[name], self.tol, f"{where}: CPU {name} vs Triton {name}")
                cache.view(-1, *cache.shape[2:])[slots] = r[f"{name}_bytes"].view(FP8_DTYPE)  # go on with Triton's

        kq.fake_quantize_fp8, kernels.write_kv = fake_quantize_fp8, write_kv

    def use_kv_scales(self, llm, triton_scales: list[tuple[float, float]]) -> None:
        """Calibrated KV scales come from amax over K and V, so they differ by summation order too:
        check that bound, then take the Triton path's so both caches hold the same bytes."""
        for layer, (ks, vs) in zip(llm.engine.model.layers, triton_scales):
            attn = layer.self_attn
            assert_within(torch.tensor([attn.k_scale, attn.v_scale]), torch.tensor([ks, vs]), self.tol, "KV scales")
            attn.k_scale, attn.v_scale = ks, vs

    def finish(self) -> None:
        assert (self.num_quant, self.num_kv) == (len(self.quant), len(self.kv)), (
            f"the CPU path made {self.num_quant} activation quantizations and {self.num_kv} FP8 KV writes, "
            f"the Triton path {len(self.quant)} and {len(self.kv)}: the hook points moved (see tests/fp8_replay.py)")
