"""Experiments: studies that call the engine on a model preset and write results (the
modular-addition replication, the language-model study, the IOI attribution demo, the
degeneracy job). Clients of `tl_degeneracy.engine` and `tl_degeneracy.models`."""
