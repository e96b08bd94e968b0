"""A small real MoE decoder served with expert-parallel all-to-all over gloo:
the engine the recovery agent drives in tests and the demo."""
