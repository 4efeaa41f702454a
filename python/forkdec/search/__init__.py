"""Search over paths that branch, on the step-level Session (forkdec.engine.session):
beam search and step-level tree search."""
from forkdec.search.beam import Beam, beam_search
from forkdec.search.tree_search import tree_search

__all__ = ["Beam", "beam_search", "tree_search"]
