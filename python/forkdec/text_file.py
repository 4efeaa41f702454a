"""Token ids of a text file, for evaluation and calibration data."""
from __future__ import annotations

from forkdec.validation import require


def read_tokens(path: str, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Token ids of the text file `path`; with max_tokens, only enough whole lines
    are tokenized to give that many (the first tokens of the whole file's encoding
    up to line-boundary effects)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"data: cannot read {path}: {e.strerror or e}") from None
    require(text.strip() != "", "data", f"{path} holds no text")
    if max_tokens is None:
        return list(tokenizer.encode(text))
    lines, ids, pos = text.splitlines(keepends=True), [], 0
    while len(ids) < max_tokens and pos < len(lines):
        step = max(64, (max_tokens - len(ids)) // 8)  # lines are ~40 tokens; overshoot, then stop
        ids += tokenizer.encode("".join(lines[pos:pos + step]))
        pos += step
    return ids[:max_tokens]
