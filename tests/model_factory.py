"""Tiny random Llama checkpoints for tests, written by transformers itself (the reference).

Three styles cover the architecture space of the foundation issue: Llama-2 (MHA, no rope scaling),
Llama-3.1 (GQA 4:1, llama3 rope scaling with a small original context so short prompts exceed it,
untied lm_head) and Llama-3.2 (GQA, tied embeddings).
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384

STYLES = {
    "llama2": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False),
    "llama31": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama32": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
}


def hf_config_dict(style: str, *, hidden_size: int = 64, layers: int = 2, overrides: dict | None = None) -> dict:
    """`overrides` (config.json fields) are applied last, e.g. head_dim or intermediate_size."""
    d = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size + 32, num_hidden_layers=layers, rms_norm_eps=1e-5,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )
    d.update(STYLES[style])
    d.update(overrides or {})
    return d


def make_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over words "w0".."wN" with <s>=1 and </s>=2 special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_checkpoint(path: Path, style: str, seed: int = 0, **kwargs) -> Path:
    """Write a random LlamaForCausalLM of `style` as an HF checkpoint directory (safetensors + tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**hf_config_dict(style, **kwargs))
    model = LlamaForCausalLM(config).float().eval()
    # Random init of norms is all-ones; perturb them so RMSNorm weights are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def load_reference(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
