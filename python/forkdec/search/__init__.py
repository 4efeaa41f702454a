"""Search over paths that branch, on the step-level Session (forkdec.engine.session):
beam search, step-level tree search and DeepConf online."""
from forkdec.search.beam import Beam, beam_search
from forkdec.search.deepconf_online import DeepConfRun, deepconf_online
from forkdec.search.tree_search import tree_search

__all__ = ["Beam", "beam_search", "DeepConfRun", "deepconf_online", "tree_search"]
