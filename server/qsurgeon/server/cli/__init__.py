"""The server portion's commands: ``prune``, ``demo``, ``evaluate``, ``bench``, ``serve``."""
