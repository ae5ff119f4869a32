"""Where compiled grammars are built and kept: one grammar thread with a deep stack, and an LRU cache
bounded in entries and in bytes.

- The grammar thread: llguidance walks a grammar's rules recursively while it compiles them, so a
  chain of a few thousand rules (`r0: r1`, `r1: r2`, ... or a `$ref` chain through `$defs`) overflows
  an 8 MiB thread stack and kills the process (measured with llguidance 1.9: 5,000 rules crash the
  main thread, 50,000 compile on a 256 MiB stack). Every build runs, one at a time, on a thread
  whose stack is 256 MiB (address space; only the pages a deep grammar touches are used), which
  holds any grammar within the text-length limit. Once built, copying a matcher, its masks and its
  tokens run on any thread.
- The size of a compiled grammar is what the process allocated while building it and its first mask
  (glibc's `mallinfo2` around the build, which runs alone on the grammar thread; other threads that
  allocate meanwhile make it approximate), and at least 16 bytes per character of grammar text (the
  smallest ratio measured: regex alternations). Without `mallinfo2` (macOS, musl) it is estimated as
  128 bytes per character plus 64 KiB (the largest ratio measured on SmolLM2's vocabulary: ~110 for a
  `choice`, ~85 for a JSON schema, ~60 for Lark, ~16 for a regex).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

GRAMMAR_THREAD_STACK = 256 << 20
MIN_BYTES_PER_CHAR = 16
ESTIMATED_BYTES_PER_CHAR, ESTIMATED_BASE_BYTES = 128, 64 << 10


class GrammarCache:
    """Least recently used first out, past `max_entries` grammars or `max_bytes` of them. Not thread-safe:
    the owner locks around it."""

    def __init__(self, max_bytes: int, max_entries: int):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def get(self, key: Any) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> bool:
        """Keep `value` (evicting the least recently used past the bounds); False, keeping nothing new,
        when it alone is larger than the whole cache."""
        self.discard(key)
        if nbytes > self.max_bytes:
            return False
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        self.shrink()
        return True

    def discard(self, key: Any) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item[1]

    def shrink(self) -> None:
        """Evict until within the bounds (after they were lowered, too)."""
        while self._items and (len(self._items) > self.max_entries or self.nbytes > self.max_bytes):
            _, (_, nbytes) = self._items.popitem(last=False)
            self.nbytes -= nbytes
            self.evictions += 1


def _mallinfo2() -> Callable[[], int] | None:
    """Bytes the C allocator has handed out and not taken back (glibc >= 2.33), or None where unknown."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2.restype = Mallinfo2

    def allocated() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd  # in use from the heaps + mmapped blocks
    return allocated


allocated_bytes = _mallinfo2()


def grammar_bytes(measured: int | None, text_chars: int) -> int:
    """What a compiled grammar counts for in the cache (see the module's docstring)."""
    if measured is None:
        return ESTIMATED_BYTES_PER_CHAR * text_chars + ESTIMATED_BASE_BYTES
    return max(measured, MIN_BYTES_PER_CHAR * text_chars)


class GrammarThread:
    """Runs builds one at a time on a thread with a GRAMMAR_THREAD_STACK stack, started on first use."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._pool is None:
                self._pool = _deep_stack_pool()
        return self._pool.submit(fn, *args).result()


def _deep_stack_pool() -> ThreadPoolExecutor:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp8-turbo-grammar")
    try:
        previous = threading.stack_size(GRAMMAR_THREAD_STACK)
    except (ValueError, RuntimeError):  # a platform that cannot set it: the default stack
        previous = None
    try:
        pool.submit(int).result()  # the pool starts its thread inside submit(), with the stack size above
    finally:
        if previous is not None:
            threading.stack_size(previous)
    return pool
