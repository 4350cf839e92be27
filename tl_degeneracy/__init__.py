"""tl_degeneracy: Local Interaction Basis, Interaction Basis and degeneracy measures for
TransformerLens models (arXiv 2405.10927, 2405.10928).

The engine (`tl_degeneracy.engine`) computes for any model and any list of sites; model presets
(`tl_degeneracy.models`) and experiments (`tl_degeneracy.experiments`) are its clients; the
views (`tl_degeneracy.viz`) render its results. The names most code needs are re-exported here.
"""

from tl_degeneracy.engine.ablation import (
    AblationCurve,
    ablation_schedule,
    last_position_accuracy,
    next_token_loss,
    node_ablation_curve,
)
from tl_degeneracy.engine.artifacts import ArtifactError, Result
from tl_degeneracy.engine.attach import ablate_nodes, attach, feature_hook_name, site_features
from tl_degeneracy.engine.attribution import (
    AttributionComparison,
    AttributionGapWarning,
    compare_attribution,
)
from tl_degeneracy.engine.bases import (
    SiteBasis,
    Truncation,
    interaction_basis,
    neuron_basis,
    pca_basis,
)
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.capture import NonFiniteActivationError, capture_sites
from tl_degeneracy.engine.compat import WeightsUnavailableError, available_apis, build_model
from tl_degeneracy.engine.distributed import DistContext
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
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import (
    LOGITS,
    Site,
    SiteError,
    residual_sites,
    site_parts,
    validate_sites,
)
from tl_degeneracy.engine.statistics import (
    GramStatistics,
    SiteStatistics,
    StatisticsMemoryError,
    StatisticsMismatchError,
    collect_statistics,
)
from tl_degeneracy.engine.streaming import (
    CheckpointDamagedError,
    Checkpointing,
    CheckpointMismatchError,
    EmptyDataError,
)
from tl_degeneracy.engine.structures import autograd_only, structure_of
from tl_degeneracy.engine.tokens import PaddingWarning, TokenError, validate_tokens

__all__ = [
    "LOGITS",
    "ModuleConfig",
    "REFERENCE_MODULES",
    "AblationCurve",
    "ArtifactError",
    "AttributionComparison",
    "AttributionGapWarning",
    "BasisResult",
    "CheckpointDamagedError",
    "CheckpointMismatchError",
    "Checkpointing",
    "DistContext",
    "EdgeAblation",
    "EdgeConfig",
    "EmptyDataError",
    "GramStatistics",
    "InteractionGraph",
    "JacobianConfig",
    "JacobianGram",
    "LIBConfig",
    "Modules",
    "NonFiniteActivationError",
    "PaddingWarning",
    "Result",
    "Section",
    "SectionEdges",
    "Site",
    "SiteBasis",
    "SiteError",
    "SiteStatistics",
    "StatisticsMemoryError",
    "StatisticsMismatchError",
    "TokenError",
    "Truncation",
    "WeightsUnavailableError",
    "ablate_nodes",
    "ablation_schedule",
    "attach",
    "autograd_only",
    "available_apis",
    "build_model",
    "capture_sites",
    "collect_statistics",
    "compare_attribution",
    "edge_ablation_score",
    "edges_required",
    "feature_hook_name",
    "find_modules",
    "fit_basis",
    "fit_lib",
    "fit_pca",
    "interaction_basis",
    "interaction_graph",
    "jacobian_gram",
    "last_position_accuracy",
    "neuron_basis",
    "next_token_loss",
    "node_ablation_curve",
    "pca_basis",
    "residual_sites",
    "section_edges",
    "site_features",
    "site_parts",
    "structure_of",
    "validate_tokens",
    "validate_sites",
]
