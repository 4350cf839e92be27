"""Prompt graphs: which features carry one prediction on one prompt, in a fitted basis, checked
by intervention (see docs/prompt_graphs.md)."""

from tl_degeneracy.engine.prompt_graph.graph import (
    NodeRef,
    PromptGraph,
    PromptGraphConfig,
    prompt_graph,
)
from tl_degeneracy.engine.prompt_graph.nodes import NodeAttributions, node_attributions, site_chain
from tl_degeneracy.engine.prompt_graph.target import Target, as_target

__all__ = [
    "NodeAttributions",
    "NodeRef",
    "PromptGraph",
    "PromptGraphConfig",
    "Target",
    "as_target",
    "node_attributions",
    "prompt_graph",
    "site_chain",
]
