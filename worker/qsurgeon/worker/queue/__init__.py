"""Queues that carry a round of block problems to solvers and their answers back: in-process, Redis Streams, and the exporting wrapper."""
