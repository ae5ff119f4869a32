"""The local text corpora of the accuracy lab: one domain to calibrate on, two other domains to score on.

- calibration (default): Python's bundled documentation, `pydoc_data.topics` (the language reference
  topics behind `help("if")`), ~110k tokens.
- scoring, held out (default, both):
  - "stdlib docstrings": the docstrings of Python's standard-library modules (module, class and
    function docstrings, read with `ast` from the sources of `sys.stdlib_module_names`, nothing
    imported), ~220k tokens of English API documentation that the calibration text does not contain:
    another text, near the calibration domain (technical prose about Python);
  - "licenses": legal English, far from it: the license texts a Linux system ships in
    /usr/share/common-licenses (GPL, LGPL, GFDL, Apache, MPL, Artistic, CC0: each file once) and
    CPython's own LICENSE.txt (the PSF license and its history); where the system directory is absent,
    the license files of the installed Python packages (`*.dist-info/licenses`, `LICENSE*`), each text
    once. These texts are common on the web, so a base model predicts them better than most prose
    (lower perplexity): quantization errors show there as flipped near-certain tokens.

All come with the interpreter or the OS, so results are reproducible offline (the licenses corpus names
the files it read: `corpus_sources`); any can be replaced by a text file. Windows are taken at evenly
spaced offsets over the whole corpus, so a small token budget still samples all of it rather than its
alphabetical beginning.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import sys
import sysconfig
from pathlib import Path

CALIBRATION_CORPUS = "pydoc_data.topics"
SCORING_CORPUS = "stdlib docstrings"
LEGAL_CORPUS = "licenses"
HELDOUT_CORPORA = (SCORING_CORPUS, LEGAL_CORPUS)  # what accuracy tables score on by default
SYSTEM_LICENSES = Path("/usr/share/common-licenses")
# Modules whose docstrings are not prose (or are the calibration corpus itself).
_SKIP_MODULES = frozenset({"pydoc_data", "this", "antigravity"})


def corpus_text(path: str | Path | None = None) -> str:
    """The calibration corpus: Python's bundled documentation, or the text file `path`."""
    if path is not None:
        return named_text(path)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def heldout_text(path: str | Path | None = None) -> str:
    """The first scoring corpus: standard-library docstrings, or the text file `path`."""
    if path is not None:
        return named_text(path)
    return _stdlib_docstrings()


def named_text(name: str | Path) -> str:
    """A corpus by name (CALIBRATION_CORPUS, SCORING_CORPUS, LEGAL_CORPUS) or a text file's path."""
    if name == CALIBRATION_CORPUS:
        return corpus_text()
    if name == SCORING_CORPUS:
        return _stdlib_docstrings()
    if name == LEGAL_CORPUS:
        return "\n\n".join(text for _, text in _license_texts())
    return Path(name).read_text(encoding="utf-8")


def corpus_sources(name: str | Path) -> list[str]:
    """Where a corpus comes from (files, or the Python module), for reports."""
    if name == LEGAL_CORPUS:
        return [source for source, _ in _license_texts()]
    return {CALIBRATION_CORPUS: ["pydoc_data.topics"], SCORING_CORPUS: ["sys.stdlib_module_names sources"]}.get(
        str(name), [str(name)])


@functools.lru_cache(maxsize=1)
def _license_texts() -> tuple[tuple[str, str], ...]:
    """(path, text) of each distinct license text, in a fixed order (see the module docstring)."""
    files = []
    if SYSTEM_LICENSES.is_dir():
        files += sorted(p for p in SYSTEM_LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files += [p for p in (stdlib / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt") if p.is_file()]
    if not SYSTEM_LICENSES.is_dir():
        site = Path(sysconfig.get_paths()["purelib"])
        files += sorted(p for p in site.glob("*.dist-info/*") if p.is_file() and p.name.upper().startswith(("LICENSE", "COPYING")))
        files += sorted(p for p in site.glob("*.dist-info/licenses/*") if p.is_file())
    seen, texts = set(), []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if text and digest not in seen:
            seen.add(digest)
            texts.append((str(path), text))
    if not texts:
        raise RuntimeError("no license texts found for the legal held-out corpus; pass a text file instead")
    return tuple(texts)


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
