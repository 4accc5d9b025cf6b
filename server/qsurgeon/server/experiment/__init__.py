"""Quantum experiments on iCBS blocks: the record a prune writes (record) and its report (report)."""
