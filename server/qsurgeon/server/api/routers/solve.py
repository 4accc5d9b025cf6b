"""``/v1/solve``: one raw block problem, answered at once when small, otherwise run as a job."""

from __future__ import annotations

import uuid
from dataclasses import replace

import numpy as np
from fastapi import APIRouter, HTTPException, status
from fastapi.responses import JSONResponse

from qsurgeon.client.errors import UsageError
from qsurgeon.client.schemas import JobKind, SolveAccepted, SolveRequest, SolveResult
import time

from qsurgeon.server.api.dependencies import Config, Control, CurrentCaller, Manager, Redis, Store
from qsurgeon.server.api.openapi import errors
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.queue.base import RoundRequest
from qsurgeon.worker.queue.producer import RedisQueue
from qsurgeon.worker.solvers.registry import solver_names

router = APIRouter(tags=["solve"])


def build_problem(body: SolveRequest) -> BlockProblem:
    """The request as a BlockProblem (dense ``Q`` or factored ``F``/``c``; ``k`` or groups)."""
    common = dict(offset=body.offset, x0=body.x0, id=body.id or "block")
    if body.k is not None:
        common["k"] = body.k
    else:
        common["groups"] = np.asarray(body.groups, dtype=np.int64)
        common["counts"] = np.asarray(body.counts, dtype=np.int64)
    if body.Q is not None:
        return BlockProblem.dense(np.asarray(body.Q, dtype=np.float64), **common)
    return BlockProblem.factored(np.asarray(body.F, dtype=np.float64),
                                 None if body.c is None else np.asarray(body.c, dtype=np.float64), **common)


@router.post("/solve", response_model=SolveResult | SolveAccepted, summary="Solve one raw block problem",
             responses={202: {"model": SolveAccepted, "description": "A large problem, run as a job"},
                        **errors(400, 413, 422, 504)})
def solve_block(body: SolveRequest, config: Config, store: Store, manager: Manager, control: Control,
                client: Redis, caller: CurrentCaller):
    if body.solver not in solver_names():
        raise UsageError(f"unknown solver {body.solver!r}; choose one of: {', '.join(solver_names())}")
    try:
        ragged = body.Q is not None and any(len(row) != len(body.Q) for row in body.Q)
        if ragged:
            raise UsageError("Q must be a square matrix (every row as long as there are rows)")
        problem = build_problem(body)
    except (ValueError, TypeError, OverflowError, IndexError) as error:
        raise UsageError(f"not a valid block problem: {error}") from None
    if problem.num_variables > config.sync_solve_max_variables:
        job_id = uuid.uuid4().hex
        job_dir = config.jobs_dir / job_id
        job_dir.mkdir(parents=True)
        problem.save_npz(job_dir / "problem.npz")
        job = store.create(JobKind.solve, {"job_id": job_id, "solver": body.solver, "params": body.params},
                           model=None, options={"solver": body.solver, "variables": problem.num_variables},
                           job_id=job_id, owner=caller.owner, deadline=time.time() + config.job_deadline_seconds)
        manager.launch(job_id)
        return JSONResponse(SolveAccepted(job=job).model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED)
    if not control.live_workers():
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no worker is running; start `qsurgeon worker`")
    settings = replace(config.queue, round_timeout=config.sync_solve_timeout)
    result = RedisQueue(settings=settings, client=client).run_round(
        RoundRequest(job_id=f"solve-{uuid.uuid4().hex}", round_id="0", problems=[problem], solver=body.solver,
                     params=body.params))
    solution = result.solutions[0]
    if solution is None:
        reason = result.failures.get(problem.id, "no answer")
        code = status.HTTP_504_GATEWAY_TIMEOUT if "timed out" in reason else status.HTTP_422_UNPROCESSABLE_CONTENT
        raise HTTPException(code, f"the problem was not solved: {reason}")
    return SolveResult(**solution.to_dict())
