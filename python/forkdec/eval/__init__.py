"""Evaluation of the model through the engine's caches: perplexity per cache kind."""
from forkdec.eval.ppl import PplResult, perplexity, read_tokens, window_nll

__all__ = ["PplResult", "perplexity", "read_tokens", "window_nll"]
