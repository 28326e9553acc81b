"""README examples that a new user copies are true: the Library snippet runs as written on
the built-in sample and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _section_code(title: str) -> str:
    text = README.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under '## {title}'"
    return match.group(1)


def test_library_snippet_prints_what_it_promises() -> None:
    code = _section_code("Library")
    promised = re.search(r"print\(.*\)\s*#\s*([\d ]+)", code)
    assert promised, "the snippet's print line says what it prints"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    assert buf.getvalue().split() == promised.group(1).split()
    assert int(buf.getvalue().split()[0]) > 0  # patches, not an empty grid
