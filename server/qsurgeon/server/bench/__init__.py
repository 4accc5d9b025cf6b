"""Reproducible benchmarks run by ``qsurgeon bench``: the quality benchmark and the small LM it prunes.

Kept apart from the engine and from evaluation so that ``qsurgeon prune`` never loads it.
"""
