"""Block solvers that run on cloud quantum services (D-Wave Leap, IBM Quantum, Amazon Braket).

Each service lives in its own module and its own pip extra (``dwave``, ``ibm``,
``braket``), so importing this package needs none of them; :mod:`.remote` holds what they
share: the per-job budget, the submit / record / resume / poll cycle through the worker's
lease, retries with backoff and the classical fallback. See docs/quantum.md.
"""
