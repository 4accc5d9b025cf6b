"""The one binary form of block problems and solutions, for byte strings and for the queue.

Every payload is::

    magic (4 bytes: b"QSBP" problem, b"QSBS" solution)
    format version (uint8, :data:`FORMAT_VERSION`)
    header length (uint32, little-endian)
    JSON header: the scalar fields and one spec per array {name, dtype, shape[, ref]}
    the raw bytes of every inline array, little-endian, in spec order

Arrays keep their dtype and bits, and floats go through JSON's shortest round-trip repr,
so a round trip is bit-exact. A spec with a ``ref`` holds no bytes: the array is stored
elsewhere under that key (the Redis queue keeps an array that many problems of a round
share once) and the decoder asks ``fetch`` for it. The version is checked first, so a
worker and an orchestrator of different releases refuse each other's messages with a
clear reason instead of misreading them.

Decoding never trusts its input: problems are rebuilt through :meth:`BlockProblem.dense`
or :meth:`BlockProblem.factored` with their full checks (Q exactly symmetric, finite
values, a constraint that fits, a feasible x0), and every malformed payload raises
:class:`~qsurgeon.client.errors.InvalidProblemError`, a UsageError.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Callable, Mapping

import numpy as np

from qsurgeon.client.errors import InvalidProblemError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution

__all__ = [
    "FORMAT_VERSION", "PROBLEM_MAGIC", "SOLUTION_MAGIC", "problem_arrays", "encode_problem", "decode_problem",
    "encode_solution", "decode_solution", "encode_result", "decode_result",
]

#: Bumped whenever the layout changes; a payload of another version is refused.
FORMAT_VERSION = 2
PROBLEM_MAGIC = b"QSBP"
SOLUTION_MAGIC = b"QSBS"

_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_DTYPES = frozenset({"<f4", "<f8", "<i4", "<i8", "|u1"})
_PROBLEM_ARRAYS = ("group_of", "counts", "Q", "F", "c", "x0")
_SOLUTION_FIELDS = ("energy", "solver", "seconds", "sweeps", "restarts", "problem_id", "metadata")
_RESULT_OK = b"OK"
_RESULT_ERROR = b"ER"
_MAX_REASON_BYTES = 4000


def problem_arrays(problem: BlockProblem) -> dict[str, np.ndarray]:
    """The arrays a problem payload carries, by name: the problem's own objects, not copies,
    so a caller can key them by ``id()`` (see the ``shared`` argument of :func:`encode_problem`)."""
    arrays = {}
    for name in _PROBLEM_ARRAYS:
        value = getattr(problem, name)
        if value is not None:
            arrays[name] = value
    return arrays


def encode_problem(problem: BlockProblem, shared: Mapping[int, str] | None = None) -> bytes:
    """A problem as bytes. ``shared`` maps ``id(array)`` to a key for arrays stored elsewhere;
    those are written as references and must be handed back by ``fetch`` when decoding."""
    header = {"id": problem.id, "offset": problem.offset, "meta": dict(problem.meta)}
    return _pack(PROBLEM_MAGIC, header, problem_arrays(problem), shared or {})


def decode_problem(payload: bytes, fetch: Callable[[str], bytes | None] | None = None) -> BlockProblem:
    """Rebuild and fully validate a problem; ``fetch(key)`` supplies referenced arrays."""
    header, arrays = _unpack(PROBLEM_MAGIC, "block problem", payload, fetch)
    unknown = set(arrays) - set(_PROBLEM_ARRAYS)
    if unknown:
        raise InvalidProblemError(f"block problem payload has unknown arrays {sorted(unknown)}")
    if "group_of" not in arrays or "counts" not in arrays:
        raise InvalidProblemError("block problem payload lacks its constraint (group_of and counts)")
    offset = header.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise InvalidProblemError("block problem payload has no numeric offset")
    common: dict[str, Any] = dict(groups=arrays["group_of"], counts=arrays["counts"], offset=offset,
                                  x0=arrays.get("x0"), id=header.get("id", ""), meta=header.get("meta"))
    if "Q" in arrays:
        if "F" in arrays or "c" in arrays:
            raise InvalidProblemError("block problem payload holds both Q and F, c")
        return BlockProblem.dense(arrays["Q"], symmetry_tolerance=0.0, **common)
    if "F" in arrays and "c" in arrays:
        return BlockProblem.factored(arrays["F"], arrays["c"], **common)
    raise InvalidProblemError("block problem payload holds neither Q nor F and c")


def encode_solution(solution: BlockSolution) -> bytes:
    """A solution as bytes: x as uint8 plus its scalar fields and metadata."""
    header = {name: getattr(solution, name) for name in _SOLUTION_FIELDS}
    header["metadata"] = dict(solution.metadata)
    return _pack(SOLUTION_MAGIC, header, {"x": np.ascontiguousarray(solution.x, dtype=np.uint8)}, {})


def decode_solution(payload: bytes) -> BlockSolution:
    """Rebuild a solution (its feasibility is the receiver's to check: it alone has the problem)."""
    header, arrays = _unpack(SOLUTION_MAGIC, "block solution", payload, None)
    x = arrays.get("x")
    if x is None or x.ndim != 1 or x.dtype != np.uint8 or set(arrays) != {"x"}:
        raise InvalidProblemError("block solution payload must hold exactly one 1-D uint8 array x")
    missing = [name for name in _SOLUTION_FIELDS if name not in header]
    if missing:
        raise InvalidProblemError(f"block solution payload lacks {', '.join(missing)}")
    return BlockSolution(x=x.copy(), **{name: header[name] for name in _SOLUTION_FIELDS})  # writable, small


def encode_result(solution: BlockSolution | None, reason: str = "") -> bytes:
    """The answer slot of one queued block: a solution, or the reason there is none."""
    if solution is not None:
        return _RESULT_OK + encode_solution(solution)
    return _RESULT_ERROR + reason.encode()[:_MAX_REASON_BYTES]


def decode_result(value: bytes) -> tuple[BlockSolution | None, str]:
    """(solution, "") or (None, reason) from :func:`encode_result`'s bytes."""
    if value[:2] == _RESULT_OK:
        return decode_solution(value[2:]), ""
    if value[:2] == _RESULT_ERROR:
        return None, bytes(value[2:]).decode(errors="replace")
    raise InvalidProblemError("queued answer is neither a solution nor a failure reason")


# ---------------------------------------------------------------------- container
def _pack(magic: bytes, header: dict[str, Any], arrays: Mapping[str, np.ndarray], shared: Mapping[int, str]) -> bytes:
    specs, blobs = [], []
    for name, array in arrays.items():
        reference = shared.get(id(array))
        array = np.ascontiguousarray(array)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if array.dtype.str not in _DTYPES:
            raise InvalidProblemError(f"cannot encode {name} of dtype {array.dtype}")
        spec: dict[str, Any] = {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}
        if reference is not None:
            spec["ref"] = reference
        else:
            blobs.append(array.tobytes())
        specs.append(spec)
    encoded = json.dumps({**header, "arrays": specs}, separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(magic, FORMAT_VERSION, len(encoded)), encoded, *blobs])


def _unpack(magic: bytes, what: str, payload: bytes,
            fetch: Callable[[str], bytes | None] | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    view = memoryview(payload)
    if len(view) < _PREFIX.size:
        raise InvalidProblemError(f"{what} payload is truncated ({len(view)} bytes, the prefix alone is "
                                  f"{_PREFIX.size})")
    found, version, header_length = _PREFIX.unpack_from(view)
    if found != magic:
        raise InvalidProblemError(f"payload is not a qsurgeon {what} (magic {found!r}, expected {magic!r})")
    if version != FORMAT_VERSION:
        raise InvalidProblemError(f"{what} payload is format version {version}; this qsurgeon reads only "
                                  f"version {FORMAT_VERSION} (sender and receiver must run the same release)")
    position = _PREFIX.size + header_length
    if position > len(view):
        raise InvalidProblemError(f"{what} payload is truncated inside its header")
    try:
        header = json.loads(bytes(view[_PREFIX.size:position]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidProblemError(f"{what} payload header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise InvalidProblemError(f"{what} payload header must be an object with an 'arrays' list")
    arrays: dict[str, np.ndarray] = {}
    for spec in header.pop("arrays"):
        name, dtype, shape = _spec(what, spec)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if "ref" in spec:
            data = None if fetch is None else fetch(str(spec["ref"]))
            if data is None:
                raise InvalidProblemError(f"{what} payload refers to stored array {spec['ref']}, which is gone")
        else:
            data = view[position:position + size]
            position += size
        if len(data) != size:
            raise InvalidProblemError(f"{what} payload is truncated: array {name} needs {size} bytes, "
                                      f"{len(data)} left")
        arrays[name] = np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    if position != len(view):
        raise InvalidProblemError(f"{what} payload has {len(view) - position} trailing bytes")
    return header, arrays


def _spec(what: str, spec: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    """Name, dtype and shape of one array spec, refusing anything but the allowed dtypes."""
    try:
        name, dtype_name, shape = str(spec["name"]), str(spec["dtype"]), tuple(int(n) for n in spec["shape"])
    except (KeyError, TypeError, ValueError):
        raise InvalidProblemError(f"{what} payload has a malformed array spec {spec!r}") from None
    if dtype_name not in _DTYPES:
        raise InvalidProblemError(f"{what} payload array {name} has dtype {dtype_name!r}, which is not allowed")
    if any(n < 0 for n in shape):
        raise InvalidProblemError(f"{what} payload array {name} has a negative dimension")
    return name, np.dtype(dtype_name), shape
