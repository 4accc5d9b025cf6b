"""The REST API of the qsurgeon service (FastAPI): jobs, raw block solving, solvers, health.

``create_app(ServiceConfig(...))`` builds it; ``qsurgeon serve`` runs it with uvicorn.
"""

from qsurgeon.server.api.app import create_app
from qsurgeon.server.api.config import ServiceConfig, load_api_keys

__all__ = ["ServiceConfig", "create_app", "load_api_keys"]
