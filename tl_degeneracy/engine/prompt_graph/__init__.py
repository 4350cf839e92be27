"""Prompt graphs: which features carry one prediction on one prompt, in a fitted basis, checked
by intervention (see docs/prompt_graphs.md)."""

from tl_degeneracy.engine.prompt_graph.compare import PatchingComparison, compare_with_patching
from tl_degeneracy.engine.prompt_graph.graph import (
    NodeRef,
    PromptGraph,
    PromptGraphConfig,
    prompt_graph,
)
from tl_degeneracy.engine.prompt_graph.interventions import (
    InterventionResult,
    NodeEffects,
    intervene,
    intervene_many,
    rank_by_effect,
)
from tl_degeneracy.engine.prompt_graph.nodes import NodeAttributions, node_attributions, site_chain
from tl_degeneracy.engine.prompt_graph.target import Target, as_target

__all__ = [
    "InterventionResult",
    "NodeAttributions",
    "NodeEffects",
    "NodeRef",
    "PatchingComparison",
    "PromptGraph",
    "PromptGraphConfig",
    "Target",
    "as_target",
    "compare_with_patching",
    "intervene",
    "intervene_many",
    "node_attributions",
    "prompt_graph",
    "rank_by_effect",
    "site_chain",
]
