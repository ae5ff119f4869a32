"""Row-wise tensor operations behind the sampler (fp8_turbo/engine/sampling/sampler.py), each on a batch of rows [N, V].

Exact versions of torch.topk/argmax that are faster on CPU, the top_k/top_p/min_p truncation of
sorted candidates, the inverse-CDF draw, and the two sampling paths: top_k rows (their best k tokens)
and rows without top_k (the whole vocabulary, top_p by rejection, no sort).

Full-vocabulary masks use float arithmetic only: on CPU, comparisons that build bool tensors
(x > level, torch.where, masked_fill) are 3-6x slower than relu/sign/threshold/sum on floats.
"""
from __future__ import annotations

import torch

_DRAW_BLOCK = 256  # a draw over the whole vocabulary picks a block of this many tokens first


def argmax_of_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) (the first index of each row's maximum, a NaN counting as the maximum) for
    x [N, V], 3-5x faster on CPU.

    An fp32 CPU tensor: numpy's argmax, one vectorised pass and one call (4 us for a 49,152-token row
    against 18 us for the blocks below). Otherwise the first block of 256 that holds the maximum (amax
    is vectorised, argmax is not), then the first maximum inside it.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        return torch.from_numpy(x.numpy().argmax(axis=-1))
    num_rows, width = x.shape
    if width % 256 or width < 4096:
        return x.argmax(dim=-1)
    blocks = x.view(num_rows, width // 256, 256)
    block = blocks.amax(dim=-1).argmax(dim=-1)  # [N]
    inside = blocks[torch.arange(num_rows, device=x.device), block].argmax(dim=-1)
    return block * 256 + inside


def top_k_of_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) for x [N, V] (values descending, and their indices), 2-4x faster on CPU.

    Split each row into blocks and keep the k blocks with the largest maxima: every one of the k
    largest values lies in one of them (a block holding one has a maximum at least that large, and
    fewer than k other blocks can beat it), so torch.topk over those k * block values finds them all.
    """
    num_rows, width = x.shape
    block = 256
    while block > 16 and k * block > width // 16:  # candidates: about 1/16 of the row
        block //= 2
    if k * block > width // 8 or width % block:
        return x.topk(k, dim=-1)
    blocks = x.view(num_rows, width // block, block)
    best_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [N, k]
    candidates = blocks.gather(1, best_blocks[:, :, None].expand(-1, -1, block))  # [N, k, block]
    values, where = candidates.view(num_rows, k * block).topk(k, dim=-1)
    return values, best_blocks.gather(1, where // block) * block + where % block


def candidate_weights(
    sorted_weights: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply top_k, top_p and min_p to candidates sorted most likely first.

    sorted_weights: [N, K] unnormalised probabilities exp((logit - max) / temperature), descending,
    so the first is 1. top_k [N] int (0 = off), top_p [N], min_p [N]. mass [N]: the row's total
    weight over the whole vocabulary when top_k is off and the candidates are not all the tokens;
    None when the candidates hold everything top_k can keep.
    Returns the weights [N, K] with 0 where filtered; the kept tokens are a prefix.
    """
    position = torch.arange(sorted_weights.shape[1], device=sorted_weights.device)
    keep_k = torch.where(top_k > 0, top_k, sorted_weights.shape[1])
    weights = sorted_weights.masked_fill(position >= keep_k[:, None], 0.0)
    if mass is None:
        mass = weights.sum(dim=-1)
    # top_p: keep a token while the probability of the tokens before it is still below top_p; this is
    # transformers' "drop where the ascending cumulative probability <= 1 - top_p" read from the top.
    before = weights.cumsum(dim=-1) - weights
    outside = (before >= (top_p * mass)[:, None]) & (top_p < 1.0)[:, None]
    weights = weights.masked_fill(outside, 0.0)
    # min_p: relative to the most likely token, whose weight is 1.
    return weights.masked_fill(weights < min_p[:, None], 0.0)


def draw_from_weights(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: per row the first position where the running weight reaches u * total.

    weights [N, K] >= 0, each row with some positive weight; uniform [N] in (0, 1]. A zero-weight
    position is never returned: its running sum equals its predecessor's, which is found first.
    Wide rows go in two levels, to skip a running sum over the whole row (the costliest pass of a
    vocabulary draw): first the block of _DRAW_BLOCK positions where the running weight reaches
    u * total, then the position inside that block, by where u * total falls within it.
    """
    num_rows, width = weights.shape
    if width % _DRAW_BLOCK or width < 16 * _DRAW_BLOCK:
        return _first_reaching(weights, uniform)
    blocks = weights.view(num_rows, -1, _DRAW_BLOCK)  # [N, nb, block]
    running = blocks.sum(dim=-1).cumsum(dim=-1)  # [N, nb]
    target = uniform * running[:, -1]
    block = torch.searchsorted(running, target[:, None])  # [N, 1]
    before = torch.nn.functional.pad(running, (1, 0)).gather(1, block)  # running weight of earlier blocks
    # u * total lies in (before, before + block weight]: its place there, as a fraction in (0, 1].
    fraction = ((target[:, None] - before) / (running.gather(1, block) - before)).clamp_(max=1.0)
    inside = blocks[torch.arange(num_rows, device=weights.device), block[:, 0]]  # [N, block]
    return block[:, 0] * _DRAW_BLOCK + _first_reaching(inside, fraction[:, 0])


def _first_reaching(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    cumulative = weights.cumsum(dim=-1)
    # At least the smallest positive float, so that a vanishing u * total cannot pick a leading 0.
    target = (uniform * cumulative[:, -1]).clamp_(min=torch.finfo(weights.dtype).tiny)
    position = torch.searchsorted(cumulative, target[:, None]).squeeze(1)
    return position.clamp_(max=weights.shape[1] - 1)  # only reachable when a row's total is subnormal


def sample_top_k(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, uniform: torch.Tensor, width: int) -> torch.Tensor:
    """Rows with top_k <= width: everything they may keep is among their `width` best tokens
    (a row with a smaller top_k gives the extra ones weight 0, so its draw does not change).

    Temperature does not change the order, so it is applied to those candidates only.
    """
    best_logits, token_ids = top_k_of_rows(x, min(width, x.shape[1]))  # [N, width], descending
    weights = ((best_logits - best_logits[:, :1]) / temperature[:, None]).exp()
    weights = candidate_weights(weights, top_k, top_p, min_p)
    return token_ids.gather(1, draw_from_weights(weights, uniform)[:, None]).squeeze(1)


def sample_vocabulary(x: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None,
                      min_p: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
    """Rows without top_k: a draw over the whole vocabulary, with top_p but without sorting.

    top_p by rejection with a rising floor (the sorting-free top-p sampling of FlashInfer): draw
    among the tokens above the floor; the draw is in the nucleus when the tokens more likely than it
    hold less than top_p of the mass, and is kept; otherwise the floor rises to its weight and the row
    draws again. Every candidate set still holds the whole nucleus, so a kept draw follows the nucleus
    distribution exactly; each try succeeds with probability >= top_p. Rows still drawing after
    the last try take the exact sorted path. top_p / min_p None: no row has one (so every first draw
    is kept / nothing is masked). x [N, V] is overwritten; uniforms [N, tries + 1].
    """
    weights = x.sub_(x.amax(dim=-1, keepdim=True)).div_(temperature[:, None]).exp_()  # [N, V], max 1
    mass = weights.sum(dim=-1) if top_p is not None else None  # before min_p: top_p comes first
    if min_p is not None:  # keep w >= min_p, i.e. w > the float just below min_p
        weights = _keep_above(weights, torch.nextafter(min_p, torch.zeros_like(min_p))[:, None])
    else:
        min_p = torch.zeros_like(temperature)
    tokens = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    pending = torch.arange(x.shape[0], device=x.device)
    candidates = weights
    for attempt in range(uniforms.shape[1] - 1):
        drawn = draw_from_weights(candidates, uniforms[:, attempt])
        if top_p is None:
            return drawn
        drawn_weight = weights.gather(1, drawn[:, None])  # [n, 1]
        in_nucleus = _mass_above(weights, drawn_weight) < top_p * mass
        tokens[pending[in_nucleus]] = drawn[in_nucleus]
        if bool(in_nucleus.all()):  # one host sync per try, not per row
            return tokens
        retry = (~in_nucleus).nonzero().squeeze(1)
        pending, weights, mass, top_p = pending[retry], weights.index_select(0, retry), mass[retry], top_p[retry]
        min_p, uniforms = min_p[retry], uniforms[retry]
        candidates = _keep_above(weights, drawn_weight[retry])
    sorted_weights, token_ids = weights.sort(dim=-1, descending=True)
    no_top_k = torch.zeros_like(pending)
    kept = candidate_weights(sorted_weights, no_top_k, top_p, min_p, mass)
    tokens[pending] = token_ids.gather(1, draw_from_weights(kept, uniforms[:, -1])[:, None]).squeeze(1)
    return tokens


def count_above(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """[N] float: how many entries of each row of x [N, V] exceed level [N, 1]."""
    return (x - level).relu_().sign_().sum(dim=-1)


def _keep_above(weights: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """weights [N, V] >= 0 with the entries <= level [N, 1] set to 0 (a new tensor)."""
    return (weights - level).relu_().sign_().mul_(weights)


def _mass_above(weights: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """[N]: the sum of the entries of each row of weights [N, V] that exceed level [N, 1] > 0.

    threshold_ takes one threshold for all rows, so compare weights / level with 1 (an entry within
    one float step of level may count either way).
    """
    return torch.nn.functional.threshold_(weights / level, 1.0, 0.0).sum(dim=-1) * level[:, 0]
