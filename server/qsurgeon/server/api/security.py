"""API-key authentication: ``Authorization: Bearer <key>`` on every route but health.

Keys are compared in constant time. With no keys configured the service is open (the
server warns at start-up); that is for a laptop, never for a shared network.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status


def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 without a key, 403 with a wrong one."""
    keys: frozenset[str] = request.app.state.config.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    token = token.strip().encode()
    if not any(hmac.compare_digest(token, key.encode()) for key in keys):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid API key")
