"""Checkpoint loading: FP8 layers are quantized while streaming (never the whole model in high precision)
and bad checkpoints fail with errors that name the problem."""
from __future__ import annotations

import json

import pytest

from fp8_turbo import LLM
from fp8_turbo.engine.model.config import ConfigError
from fp8_turbo.engine.model.linear import Linear
from fp8_turbo.engine.checkpoints.source import CheckpointError
from model_factory import make_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck"), "llama31", layers=4)


def test_fp8_layers_are_quantized_as_they_stream_in(src, monkeypatch):
    """Each quantized Linear is finalized as soon as its last shard arrives: when one is, at most two
    others (a q/k/v or gate/up still waiting for a shard) hold high-precision weights."""
    pending_at_finalize = []
    original = Linear.finalize

    def spy(self):
        if self.scheme != "none" and self.weight_fp8 is None:
            linears = [m for m in spy.model_ref.modules() if isinstance(m, Linear)] if spy.model_ref else []
            pending_at_finalize.append(sum(1 for m in linears if m is not self and m.scheme != "none"
                                           and m.weight_fp8 is None and not m.weight.is_meta))
        original(self)

    spy.model_ref = None
    import fp8_turbo.engine.checkpoints.loader as loader

    build = loader.LlamaModel

    class Recording(build):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            spy.model_ref = self

    monkeypatch.setattr(Linear, "finalize", spy)
    monkeypatch.setattr(loader, "LlamaModel", Recording)
    LLM(str(src), device="cpu", quantization="fp8")
    assert len(pending_at_finalize) == 4 * 4 - 2  # every quantized Linear (last block's MLP is kept)
    assert max(pending_at_finalize) <= 2, pending_at_finalize


def test_bad_checkpoints_raise_clear_errors(src, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(tmp_path / "missing"), device="cpu")
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        LLM(str(bad), device="cpu")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LLM(str(truncated), device="cpu")


def test_prompt_longer_than_max_model_len_is_rejected(src):
    from fp8_turbo.engine.core.llm_engine import PromptTooLongError

    llm = LLM(str(src), device="cpu", max_model_len=32)
    with pytest.raises(PromptTooLongError, match="max_model_len is 32"):
        llm.generate([{"prompt_token_ids": list(range(3, 40))}])
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
