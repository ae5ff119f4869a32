"""Check that README.md shows what the code does: run its Python snippets and commands on the default
model and compare what they print with what the README says they print.

    python scripts/check_readme.py            # exit status 1 and a list of mismatches if any

Every fenced code block is checked except those under "## Measured" (benchmark numbers, not examples);
Python under "## Tensor parallelism" is compiled, not run (it starts worker processes that take minutes
on a busy 2-core machine; tests/test_tensor_parallel.py runs TP on the CPU):

```python blocks run top to bottom in one namespace. A run of `# ` comment lines right after a line of
  code is the expected output of the code since the previous one: compared exactly (greedy output),
  or by shape when it starts with `# e.g. ` (sampled output: numbers and quoted strings may differ,
  everything else must match).
```bash / ```console blocks: `$ command` lines run (`\\` continues a line; `fp8-turbo` runs this
  checkout's `python -m fp8_turbo`), in a scratch directory; the lines below are what they print: stdout
  exactly, then (if shown) the last line of stderr, a status line with timings, by shape; JSON output
  by shape (keys and value types). Commands the checker knows:
    fp8-turbo serve ...  started in the background on a free port (the README's port 8000 is replaced
                         by it in every later command and output); its line is the start-up log line;
    curl ...             needs that server;
    lm_eval ...          not run (lm-eval is not a dependency): its base_url must answer on that server
                         and its tokenizer= must be a directory a command above wrote.
  Lines without `$` are shown, not run: `fp8-turbo ...` lines must parse, `make ...` lines dry-run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SKIPPED_SECTIONS = ("## Measured",)
COMPILE_ONLY_SECTIONS = ("## Tensor parallelism",)
README_PORT = 8000
SERVE_TIMEOUT_S = 600  # model load on a busy 2-core machine has taken a minute; leave room

_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(slots=True)
class Block:
    lang: str
    line: int  # 1-based line of the first line inside the fence
    lines: list[str]
    section: str = ""  # the "## " heading above it


def read_blocks(text: str) -> list[Block]:
    """Fenced code blocks outside SKIPPED_SECTIONS, in order."""
    blocks, section, current = [], "", None
    for number, line in enumerate(text.splitlines(), 1):
        if current is None:
            if line.startswith("## "):
                section = line
            elif line.startswith("```") and not section.startswith(SKIPPED_SECTIONS):
                current = Block(line[3:].strip(), number + 1, [], section)
        elif line.startswith("```"):
            blocks.append(current)
            current = None
        else:
            current.lines.append(line)
    return blocks


def shape(text: str) -> str:
    """Text with quoted strings replaced by S and numbers by N."""
    return _NUMBER.sub("N", _STRING.sub("S", text))


def json_shape(value):
    if isinstance(value, dict):
        return {k: json_shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_shape(v) for v in value]
    if isinstance(value, bool) or value is None:
        return repr(value)
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def compare(where: str, expected: list[str], actual: str, by_shape: bool) -> list[str]:
    """[] when `actual` matches the expected lines, else one message."""
    want, got = "\n".join(expected), actual.rstrip("\n")
    if by_shape:
        want = want.removeprefix("e.g. ")
        ok = shape(want) == shape(got)
    else:
        ok = want == got
    return [] if ok else [f"{where}: the README says\n{_indent(want)}\n  but it prints\n{_indent(got)}"]


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines()) or "    (nothing)"


# ---------------------------------------------------------------------------------------------- Python


def check_python(blocks: list[Block]) -> list[str]:
    """Run the ```python blocks in one namespace; compare each expected-output comment run."""
    namespace: dict = {"__name__": "__readme__"}
    errors = []
    for block in (b for b in blocks if b.lang == "python"):
        if block.section.startswith(COMPILE_ONLY_SECTIONS):
            compile("\n".join(block.lines), f"README.md:{block.line}", "exec")  # a SyntaxError names the line
            continue
        code: list[str] = []
        start = i = 0
        while i < len(block.lines):
            line = block.lines[i]
            if line.startswith("# ") and code and code[-1].strip() and not code[-1].startswith("#"):
                expected = []
                while i < len(block.lines) and block.lines[i].startswith("# "):
                    expected.append(block.lines[i][2:])
                    i += 1
                where = f"README.md:{block.line + start}"
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile("\n".join(code), where, "exec"), namespace)
                errors += compare(where, expected, out.getvalue(), expected[0].startswith("e.g. "))
                code, start = [], i
                continue
            code.append(line)
            i += 1
        if any(line.strip() for line in code):
            exec(compile("\n".join(code), f"README.md:{block.line + start}", "exec"), namespace)
    return errors


# ---------------------------------------------------------------------------------------------- commands


@dataclass(slots=True)
class Command:
    text: str
    line: int
    run: bool  # a `$ ` line (run) or a shown one (parsed / dry-run)
    expected: list[str] = field(default_factory=list)


def read_commands(block: Block) -> list[Command]:
    """`$ ` commands with every line up to the next `$ ` as their output (blank lines included), and
    shown commands: non-comment lines before the block's first `$ `."""
    commands: list[Command] = []
    continued = False  # the previous command line ended with "\"
    for offset, line in enumerate(block.lines):
        if continued:
            commands[-1].text = commands[-1].text[:-1].rstrip() + " " + line.strip()
        elif line.startswith("$ "):
            commands.append(Command(line[2:].strip(), block.line + offset, True))
        elif commands and commands[-1].run:
            commands[-1].expected.append(line)
            continue
        elif line.strip() and not line.lstrip().startswith("#"):
            commands.append(Command(line.strip(), block.line + offset, False))
        else:
            continue
        continued = commands[-1].text.endswith("\\")
    for cmd in commands:
        while cmd.expected and not cmd.expected[-1].strip():
            cmd.expected.pop()
    return commands


class CommandRunner:
    """Runs the README's commands in `workdir`, with at most one `fp8-turbo serve` in the background."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = _free_port()
        self.server: subprocess.Popen | None = None
        self.server_log: list[str] = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def localize(self, text: str) -> str:
        """The README's port 8000 -> the free port this run serves on; fp8-turbo -> this checkout."""
        text = text.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{self.port}")
        text = text.replace(f"--port {README_PORT}", f"--port {self.port}")
        return re.sub(r"(^|[|;&]\s*)fp8-turbo\b", lambda m: m.group(1) + shlex.quote(sys.executable) + " -m fp8_turbo", text)

    def check(self, cmd: Command) -> list[str]:
        where = f"README.md:{cmd.line} `{cmd.text[:60]}`"
        words = shlex.split(cmd.text, comments=True)
        if not words:
            return []
        if not cmd.run:
            return self._check_shown(where, words)
        if words[:2] == ["fp8-turbo", "serve"]:
            return self._start_server(where, cmd)
        if words[0] == "lm_eval":
            return self._check_lm_eval(where, words)
        if words[0] == "curl" and self.server is None:
            return [f"{where}: a curl example needs a `$ fp8-turbo serve` command before it"]
        proc = subprocess.run(["bash", "-c", self.localize(cmd.text)], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=SERVE_TIMEOUT_S)
        if proc.returncode != 0:
            return [f"{where}: exit status {proc.returncode}\n{_indent(proc.stderr[-2000:])}"]
        expected = [self.localize(line) for line in cmd.expected]
        if expected and expected[0].lstrip().startswith(("{", "[")):
            return self._compare_json(where, expected, proc.stdout)
        stdout_lines = len(proc.stdout.rstrip("\n").splitlines())
        errors = compare(where, expected[:stdout_lines], proc.stdout, by_shape=False)
        if expected[stdout_lines:]:  # a status line shown: stderr's last (progress bars and warnings come before)
            status = proc.stderr.rstrip("\n").splitlines()[-1:]
            errors += compare(f"{where} (stderr)", expected[stdout_lines:], "\n".join(status), by_shape=True)
        return errors

    def _check_shown(self, where: str, words: list[str]) -> list[str]:
        if words[0] == "fp8-turbo":
            from fp8_turbo.engine.serving.cli import build_parser

            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    build_parser().parse_args(words[1:])
            except SystemExit:
                return [f"{where}: does not parse:\n{_indent(err.getvalue())}"]
        elif words[0] == "make":
            proc = subprocess.run(["make", "-n", "-C", str(REPO), *words[1:]], capture_output=True, text=True)
            if proc.returncode != 0:
                return [f"{where}: make -n fails:\n{_indent(proc.stderr)}"]
        return []

    def _start_server(self, where: str, cmd: Command) -> list[str]:
        if self.server is not None:
            return [f"{where}: a second server; the checker runs one"]
        if f"--port {README_PORT}" not in cmd.text:
            return [f"{where}: say --port {README_PORT} explicitly (the checker serves on a free port instead)"]
        self.server = subprocess.Popen(["bash", "-c", "exec " + self.localize(cmd.text)], cwd=self.workdir, env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: self.server_log.extend(self.server.stderr), daemon=True).start()
        expected = [shape(self.localize(line)) for line in cmd.expected]
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while time.monotonic() < deadline and self.server.poll() is None:
            if all(any(shape(line.rstrip("\n")) == want for line in self.server_log) for want in expected):
                return self._wait_healthy(where, deadline)
            time.sleep(0.5)
        return [f"{where}: the README's start-up line never appeared:\n{_indent(chr(10).join(cmd.expected))}\n"
                f"  the server printed\n{_indent(''.join(self.server_log[-30:]))}"]

    def _wait_healthy(self, where: str, deadline: float) -> list[str]:
        while time.monotonic() < deadline and self.server.poll() is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return []
            time.sleep(0.5)
        return [f"{where}: the server never answered /health:\n{_indent(''.join(self.server_log[-30:]))}"]

    def _compare_json(self, where: str, expected: list[str], stdout: str) -> list[str]:
        try:
            want = json.loads("\n".join(expected))
        except json.JSONDecodeError as e:
            return [f"{where}: the README's output is not valid JSON ({e})"]
        try:
            got = json.loads(stdout)
        except json.JSONDecodeError:
            return [f"{where}: the command printed no JSON:\n{_indent(stdout)}"]
        if json_shape(want) != json_shape(got):
            return [f"{where}: JSON of another shape; the README says\n{_indent(json.dumps(json_shape(want)))}\n"
                    f"  but it prints\n{_indent(json.dumps(json_shape(got)))}"]
        return []

    def _check_lm_eval(self, where: str, words: list[str]) -> list[str]:
        if self.server is None:
            return [f"{where}: an lm_eval example needs a `$ fp8-turbo serve` command before it"]
        if "--model_args" not in words:
            return [f"{where}: no --model_args"]
        model_args = dict(arg.split("=", 1) for arg in words[words.index("--model_args") + 1].split(",") if "=" in arg)
        if not {"model", "base_url"} <= model_args.keys():
            return [f"{where}: --model_args needs model= and base_url=, got {sorted(model_args)}"]
        errors = []
        request = urllib.request.Request(self.localize(model_args["base_url"]), headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": model_args["model"], "prompt": "Hi", "max_tokens": 1}).encode())
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                json.load(response)
        except OSError as e:
            errors.append(f"{where}: base_url {model_args['base_url']} with model={model_args['model']} fails: {e}")
        tokenizer = self.workdir / model_args.get("tokenizer", "")
        if "tokenizer" not in model_args or not (tokenizer / "tokenizer.json").is_file():
            errors.append(f"{where}: tokenizer={model_args.get('tokenizer')} is no tokenizer directory written above")
        return errors

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_commands(blocks: list[Block], workdir: Path) -> list[str]:
    """Run or parse every command of the ```bash / ```console blocks (see the module docstring)."""
    runner = CommandRunner(workdir)
    errors = []
    try:
        for block in (b for b in blocks if b.lang in ("bash", "console", "sh", "shell")):
            for cmd in read_commands(block):
                errors += runner.check(cmd)
    finally:
        runner.close()
    return errors


def main() -> int:
    import tempfile

    sys.path.insert(0, str(REPO))
    blocks = read_blocks(README.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as workdir:
        errors = check_python(blocks) + check_commands(blocks, Path(workdir))
    for error in errors:
        print(error, end="\n\n")
    print(f"README.md: {len(errors)} mismatch(es) in {len(blocks)} code blocks" if errors else "README.md: as the code does")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
