"""One FastAPI router per resource, without their prefix: :func:`~qsurgeon.server.api.app.create_app`
mounts ``V1_ROUTERS`` under ``/v1`` behind the API key (one place, so a new resource cannot
forget it), and ``health.router`` at the root without one, for load balancers and probes.
"""

from qsurgeon.server.api.routers import health, jobs, metrics, options, solve, solvers

V1_ROUTERS = (jobs.router, solve.router, solvers.router, options.router, metrics.router)
PROBES = health.router

__all__ = ["PROBES", "V1_ROUTERS"]
