"""The worker portion's commands: ``qsurgeon solve``, ``qsurgeon solvers``, ``qsurgeon worker``."""
