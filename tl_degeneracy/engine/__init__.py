"""The engine: everything that computes, for any TransformerLens model and any list of sites.

It knows nothing about particular models; model presets (`tl_degeneracy.models`) and experiments
(`tl_degeneracy.experiments`) are its clients, and the views (`tl_degeneracy.viz`) render its
results. See docs/architecture.md for the modules in data-flow order.
"""
