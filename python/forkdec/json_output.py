"""`--json PATH` for every command: PATH "-" means standard output.

Then standard output carries the JSON alone, so it can be piped; what the
command prints for people goes to standard error instead (`human_output`).
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    text = json.dumps(obj, indent=indent)
    if path == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        Path(path).write_text(text)


@contextlib.contextmanager
def human_output(json_path: str | None) -> Iterator[None]:
    """Inside: print() goes to stderr when the JSON takes stdout (`--json -`)."""
    if json_path == "-":
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield
