"""README.md shows what the code does: its Python snippets and commands run on the default model and
print what the README says (scripts/check_readme.py: greedy output exactly, sampled output by shape)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_readme", REPO / "scripts" / "check_readme.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_readme = _load_checker()
BLOCKS = check_readme.read_blocks(check_readme.README.read_text(encoding="utf-8"))


def test_python_snippets():
    errors = check_readme.check_python(BLOCKS)
    assert not errors, "\n\n".join(errors)


def test_commands(tmp_path):
    errors = check_readme.check_commands(BLOCKS, tmp_path)
    assert not errors, "\n\n".join(errors)


def test_every_kind_of_example_is_checked():
    """A README edit (or a parser change) must not leave the examples silently unchecked."""
    commands = [c for b in BLOCKS if b.lang in ("bash", "console") for c in check_readme.read_commands(b)]
    run = {" ".join(c.text.split()[:2]) for c in commands if c.run}
    assert {"fp8-turbo generate", "fp8-turbo serve", "fp8-turbo export-tokenizer"} <= run, run
    assert {c.text.split()[0] for c in commands if c.run} >= {"curl", "lm_eval"}
    shown = {" ".join(c.text.split()[:2]) for c in commands if not c.run}
    assert {"make run", "make test", "fp8-turbo eval", "fp8-turbo quantize", "fp8-turbo chat"} <= shown, shown
    python = [b for b in BLOCKS if b.lang == "python"]
    assert python and sum(line.startswith("# ") for b in python for line in b.lines) >= 3


def test_shape_and_command_parsing():
    assert check_readme.shape("[60, 23] Logprob(logprob=-1.83, rank=2, decoded_token='L')") == \
        check_readme.shape('[1, 2] Logprob(logprob=3e-05, rank=1, decoded_token="\'s")')
    assert check_readme.shape("'a' stop") != check_readme.shape("'a' length")
    block = check_readme.Block("console", 10, ["$ echo a \\", "    b", "a b", "", "x", "$ true"])
    first, second = check_readme.read_commands(block)
    assert (first.text, first.expected, first.line) == ("echo a b", ["a b", "", "x"], 10)
    assert (second.text, second.expected) == ("true", [])
