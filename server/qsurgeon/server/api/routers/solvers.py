"""``/v1/solvers``: the registered block solvers and what they can do."""

from __future__ import annotations

from fastapi import APIRouter

from qsurgeon.server.api.openapi import errors

from qsurgeon.client.schemas import SolverInfo
from qsurgeon.worker.solvers.registry import all_capabilities

router = APIRouter(tags=["solve"])


@router.get("/solvers", response_model=list[SolverInfo], responses=errors(),
            summary="Solvers and their capabilities")
def solvers() -> list[SolverInfo]:
    return [SolverInfo(**capability.to_dict()) for capability in all_capabilities()]
