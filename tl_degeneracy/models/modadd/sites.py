"""The sites of the modular-addition studies: the reference implementation's node layers."""

from tl_degeneracy.engine.sites import Site

REFERENCE_SITES = (
    Site("blocks.0.hook_resid_pre"),
    Site("blocks.0.hook_resid_mid", "last"),
    Site("blocks.0.hook_resid_post", "last"),
    Site("logits", "last"),
)
"""The reference's node layers ln1.0, ln2.0, unembed and output, as TransformerLens sites."""
