"""tl_degeneracy: Local Interaction Basis, Interaction Basis and degeneracy measures for
TransformerLens models (arXiv 2405.10927, 2405.10928)."""

from tl_degeneracy.engine.ablation import (
    AblationCurve,
    ablation_schedule,
    last_position_accuracy,
    next_token_loss,
    node_ablation_curve,
)
from tl_degeneracy.engine.attach import ablate_nodes, attach, feature_hook_name, site_features
from tl_degeneracy.engine.attribution import AttributionComparison, compare_attribution
from tl_degeneracy.engine.bases import (
    SiteBasis,
    Truncation,
    interaction_basis,
    neuron_basis,
    pca_basis,
)
from tl_degeneracy.engine.compat import available_apis, build_model
from tl_degeneracy.engine.edge_ablation import EdgeAblation, edge_ablation_score, edges_required
from tl_degeneracy.engine.edges import (
    EdgeConfig,
    InteractionGraph,
    SectionEdges,
    interaction_graph,
    section_edges,
)
from tl_degeneracy.engine.fit import LIBConfig, fit_basis, fit_lib, fit_pca
from tl_degeneracy.engine.jacobians import JacobianConfig, JacobianGram, jacobian_gram
from tl_degeneracy.engine.modularity import REFERENCE_MODULES, ModuleConfig, Modules, find_modules
from tl_degeneracy.engine.result import ArtifactError, BasisResult
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import LOGITS, Site, SiteError, validate_sites
from tl_degeneracy.engine.statistics import (
    GramStatistics,
    NonFiniteActivationError,
    SiteStatistics,
    StatisticsMismatchError,
    collect_statistics,
)
from tl_degeneracy.engine.streaming import Checkpointing, EmptyDataError

__all__ = [
    "Modules",
    "ModuleConfig",
    "REFERENCE_MODULES",
    "SectionEdges",
    "InteractionGraph",
    "EdgeConfig",
    "EdgeAblation",
    "AblationCurve",
    "AttributionComparison",
    "ArtifactError",
    "BasisResult",
    "Checkpointing",
    "EmptyDataError",
    "GramStatistics",
    "JacobianConfig",
    "JacobianGram",
    "LIBConfig",
    "LOGITS",
    "NonFiniteActivationError",
    "Section",
    "Site",
    "SiteBasis",
    "SiteError",
    "SiteStatistics",
    "StatisticsMismatchError",
    "Truncation",
    "ablate_nodes",
    "ablation_schedule",
    "attach",
    "available_apis",
    "build_model",
    "collect_statistics",
    "compare_attribution",
    "feature_hook_name",
    "fit_basis",
    "fit_lib",
    "fit_pca",
    "interaction_basis",
    "jacobian_gram",
    "last_position_accuracy",
    "neuron_basis",
    "next_token_loss",
    "node_ablation_curve",
    "pca_basis",
    "site_features",
    "validate_sites",
    "find_modules",
    "section_edges",
    "interaction_graph",
    "edges_required",
    "edge_ablation_score",
]
