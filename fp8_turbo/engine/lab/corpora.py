"""The two local text corpora of the accuracy lab: one to calibrate on, another to score on.

- calibration (default): Python's bundled documentation, `pydoc_data.topics` (the language reference
  topics behind `help("if")`), ~110k tokens.
- scoring (default, held out): the docstrings of Python's standard-library modules (module, class and
  function docstrings, read with `ast` from the sources of `sys.stdlib_module_names`, nothing imported),
  ~220k tokens of English documentation that the calibration text does not contain.

Both ship with every CPython, so results are reproducible offline; either can be replaced by a text
file. Windows are taken at evenly spaced offsets over the whole corpus, so a small token budget still
samples all of it rather than its alphabetical beginning.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from pathlib import Path

CALIBRATION_CORPUS = "pydoc_data.topics"
SCORING_CORPUS = "stdlib docstrings"
# Modules whose docstrings are not prose (or are the calibration corpus itself).
_SKIP_MODULES = frozenset({"pydoc_data", "this", "antigravity"})


def corpus_text(path: str | Path | None = None) -> str:
    """The calibration corpus: Python's bundled documentation, or the text file `path`."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def heldout_text(path: str | Path | None = None) -> str:
    """The scoring corpus: standard-library docstrings, or the text file `path`."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return _stdlib_docstrings()


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> str:
    docs: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        spec = importlib.util.find_spec(name)  # top-level names: locates the file without importing it
        origin = spec.origin if spec is not None else None
        if not origin or not origin.endswith(".py"):
            continue  # built-in, frozen or extension module: no source
        try:
            tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        _collect_docstrings(tree, docs)
    if not docs:
        raise RuntimeError("no standard-library sources found for the held-out corpus; pass a text file instead")
    return "\n\n".join(docs)


def _collect_docstrings(node: ast.AST, out: list[str]) -> None:
    """Docstrings of a module and its classes and functions, in source order."""
    doc = ast.get_docstring(node) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                        ast.AsyncFunctionDef)) else None
    if doc:
        out.append(doc)
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            _collect_docstrings(child, out)


def corpus_windows(tokenizer, text: str, window: int, max_tokens: int) -> list[list[int]]:
    """min(max_tokens // window, available) windows of `window` tokens, at evenly spaced, non-overlapping
    offsets over the whole text (consecutive when the budget covers all of it)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    available = len(ids) // window
    n = min(available, max_tokens // window)
    if n == 0:
        raise ValueError(f"corpus has {len(ids)} tokens; need at least one window of {window} (max_tokens={max_tokens})")
    starts = [(i * available // n) * window for i in range(n)]
    return [ids[s:s + window] for s in starts]
