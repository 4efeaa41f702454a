"""Beam search on a Session: every beam is a live path, every step one forward over all of them.

Each step, every (beam, next token) pair is a candidate scored by the beam's summed
log p plus the token's log p (temperature 1, no filter); the best 2W candidates are
taken in order (ties: lower beam, then lower token id): one that ends the text (EOS
or a stop token) joins the finished hypotheses if it ranks within the first W, the
others continue, up to W of them, each beam forking into the children it got
(`Session.fork(..., tokens=...)`, so shared prefixes stay stored once). A hypothesis
scores summed log p / generated_length ** length_penalty; the search ends when W
hypotheses have finished (early stopping) or at max_new_tokens, where the live beams
join the hypotheses. This is Hugging Face's `num_beams` with `early_stopping=True`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from forkdec.engine.params import SamplingParams
from forkdec.validation import require


@dataclass
class Beam:
    """A finished hypothesis: generated tokens (ending token included), summed log p, and score."""
    token_ids: list[int]
    cumulative_logprob: float
    score: float
    text: str = ""
    finish_reason: str = "stop"


def _score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(1, length) ** length_penalty)


def _add(pool: list[Beam], hyp: Beam, width: int) -> None:
    pool.append(hyp)
    pool.sort(key=lambda h: -h.score)
    del pool[width:]


def beam_search(session, prompt, *, width: int = 4, max_new_tokens: int = 64, length_penalty: float = 1.0,
                n: int | None = None, chat: bool = True, stop_token_ids=()) -> list[Beam]:
    """The n best hypotheses (default: all `width`) of `prompt` (text or token ids), best first."""
    require(isinstance(width, int) and width >= 1, "width", f"must be an int >= 1, got {width!r}")
    require(isinstance(max_new_tokens, int) and max_new_tokens >= 1, "max_new_tokens",
            f"must be an int >= 1, got {max_new_tokens!r}")
    n = width if n is None else n
    require(isinstance(n, int) and 1 <= n <= width, "n", f"must be an int in 1..width ({width}), got {n!r}")
    ends = set(session.engine.eos_ids()) | set(stop_token_ids)
    # the session never ends a beam itself: this search decides (one token of headroom for the last fork)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens + 1, ignore_eos=True)
    [first] = session.start(prompt, 1, params, chat=chat)
    beams = [first]
    pool: list[Beam] = []
    tok = session.engine.tokenizer
    for length in range(1, max_new_tokens + 1):
        before = [sum(session.path(b).token_logprobs[:-1]) for b in beams]
        # one log-softmax over all beams' pending distributions (Session.logprobs row by row)
        rows = torch.log_softmax(torch.stack([session.path(b).logits for b in beams]), dim=-1)  # [B, V]
        scores = rows.double() + torch.tensor(before, dtype=torch.float64)[:, None]
        vocab = rows.shape[1]
        flat = scores.flatten()
        k = min(2 * width, flat.numel())
        # stable ordering of ties: topk, then sort by (-score, index)
        top = torch.topk(flat, k).values[-1]
        cand = torch.nonzero(flat >= top).flatten()
        order = sorted(cand.tolist(), key=lambda i: (-float(flat[i]), i))[:k]
        keep: dict[int, list[int]] = {}
        kept = 0
        for rank, i in enumerate(order):
            b, t = divmod(i, vocab)
            path = session.path(beams[b])
            if t in ends:
                if rank < width:
                    ids = path.token_ids[:-1] + [t]
                    _add(pool, Beam(ids, float(flat[i]), _score(float(flat[i]), length, length_penalty),
                                    tok.decode(ids), "stop"), width)
                continue
            if kept < width:
                keep.setdefault(b, []).append(t)
                kept += 1
        last = length == max_new_tokens
        done = len(pool) >= width
        next_beams = []
        for b, beam in enumerate(beams):
            if b in keep and last and not done:  # max_new_tokens reached: the live candidates are hypotheses too
                for t in keep[b]:
                    ids = session.path(beam).token_ids[:-1] + [t]
                    lp = before[b] + float(rows[b, t])
                    _add(pool, Beam(ids, lp, _score(lp, length, length_penalty), tok.decode(ids), "length"), width)
            if b in keep and not (last or done):
                next_beams += session.fork(beam, len(keep[b]), tokens=keep[b])
            else:
                session.stop(beam)
        beams = next_beams
        if not beams:
            break
        session.step()
    return pool[:n]
