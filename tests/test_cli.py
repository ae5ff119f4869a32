"""The command line around the engine: serve refuses a taken address before loading anything, make run
passes HOST/PORT through, eval takes comma- or space-separated schemes, export-tokenizer writes
Hugging Face tokenizer files that encode like the engine's tokenizer (GGUF included)."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from fp8_turbo.engine.checkpoints.source import resolve_model
from fp8_turbo.engine.serving.cli import build_parser, listen_problem, main
from fp8_turbo.engine.serving.cli_quant import EVAL_SCHEMES
from model_factory import make_checkpoint
from fp8_turbo.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_names_a_taken_address_before_loading_the_model(taken_port, capsys):
    # A model that does not exist: reaching the loader would raise FileNotFoundError instead.
    assert main(["serve", "--model", "/nonexistent/model.gguf", "--port", str(taken_port)]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{taken_port} is already in use" in err and "--port" in err, err


def test_listen_problem():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert listen_problem("127.0.0.1", free) is None
    assert "0..65535" in listen_problem("127.0.0.1", 70000)
    assert "cannot resolve" in listen_problem("no-such-host.invalid", 8000)


def test_make_run_passes_host_and_port():
    out = subprocess.run(["make", "-n", "-C", str(REPO), "run", "HOST=0.0.0.0", "PORT=8123"],
                         capture_output=True, text=True, check=True).stdout
    assert "serve --model smollm2-135m-instruct --quantization fp8 --host 0.0.0.0 --port 8123" in out, out


@pytest.mark.parametrize("argv", [["none,fp8,fp8-block"], ["none", "fp8", "fp8-block"], ["none,fp8", "fp8-block"]])
def test_eval_schemes_comma_or_space_separated(argv):
    args = build_parser().parse_args(["eval", "--schemes", *argv])
    assert args.schemes == ["none", "fp8", "fp8-block"]


def test_eval_schemes_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--schemes", "fp8,fp9"])
    err = capsys.readouterr().err
    assert "fp9" in err and ", ".join(EVAL_SCHEMES) in err


def _assert_exported_tokenizer_encodes_like(model: str, out: Path, texts: list[str]) -> None:
    from transformers import AutoTokenizer

    assert main(["export-tokenizer", "--model", model, "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    theirs, ours = AutoTokenizer.from_pretrained(str(out)), load_tokenizer(resolve_model(model).path)
    for text in texts:
        assert theirs.encode(text) == ours.encode(text), text
        assert theirs.decode(theirs.encode(text, add_special_tokens=False)) == text
    # The chat template the engine renders with (the model's, else the built-in Llama 3 one) goes along.
    messages = [{"role": "user", "content": texts[0]}]
    prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert theirs.encode(prompt, add_special_tokens=False) == ours.apply_chat_template(messages)


def test_export_tokenizer_of_the_default_gguf(tmp_path):
    texts = ["Hello, world!", "  two spaces, a tab\tand ünïcödé 😀", "def f(x):\n    return x ** 2\n"]
    _assert_exported_tokenizer_encodes_like("smollm2-135m-instruct", tmp_path / "tok", texts)


def test_export_tokenizer_of_an_hf_checkpoint(tmp_path):
    path = str(make_checkpoint(tmp_path / "ck", "llama32"))  # a word-level tokenizer over w3..w383
    _assert_exported_tokenizer_encodes_like(path, tmp_path / "tok", ["w5 w6 w7", "w300"])
