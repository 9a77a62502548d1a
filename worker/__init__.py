"""cxr-triage edge worker (no torch)."""
