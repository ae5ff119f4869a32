"""Per-request sampling options (params.py) and the batched sampler (sampler.py, ops.py): logits in,
tokens out. A leaf: imports only torch, numpy and its own modules."""
