"""Attribution patching in a basis (docs/attribution.md): gradients at sites (`gradients`),
true activation patching (`patching`), and the per-feature comparison with TransformerLens's
attribution patching and the features' importances (`comparison`)."""

from tl_degeneracy.engine.attribution.comparison import (
    AttributionComparison,
    compare_attribution,
    format_correlation_table,
)
from tl_degeneracy.engine.attribution.gradients import (
    AttributionMetric,
    site_gradients,
    tl_site_attribution,
    tl_sites_attribution,
)
from tl_degeneracy.engine.attribution.patching import (
    feature_patching_effects,
    site_patching_effect,
)
from tl_degeneracy.engine.attribution.site_scores import (
    AttributionGapWarning,
    SiteAttribution,
    spearman,
)

__all__ = [
    "AttributionComparison",
    "AttributionGapWarning",
    "AttributionMetric",
    "SiteAttribution",
    "compare_attribution",
    "feature_patching_effects",
    "format_correlation_table",
    "site_gradients",
    "site_patching_effect",
    "spearman",
    "tl_site_attribution",
    "tl_sites_attribution",
]
