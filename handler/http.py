"""The HTTP side: health check (and, mounted by the composition root, the SMS webhook).

`/healthz` answers JSON an operator or a load balancer can read: status, version, whether
the database answers, and which rules are loaded (version, load time, last reload error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from handler import __version__
from handler.live import LiveRules


def make_http_app(
    *, rules: LiveRules, db_ping: Callable[[], bool], extra_routes: Sequence[BaseRoute] = (),
    extra_health: Callable[[], dict[str, Any]] = dict,
) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        database = await asyncio.to_thread(db_ping)
        status = rules.status
        body = {
            "status": "ok" if database else "degraded",
            "version": __version__,
            "database": {"reachable": database},
            "rules": {
                "loaded": True,
                "version": status.version,
                "rule_count": len(rules.ruleset.rules),
                "loaded_at": status.loaded_at.isoformat(),
                "last_reload_error": status.last_error or None,
                "last_reload_error_at": (status.last_error_at.isoformat()
                                         if status.last_error_at else None),
            },
            **extra_health(),
        }
        return JSONResponse(body, status_code=200 if database else 503)

    return Starlette(routes=[Route("/healthz", healthz), *extra_routes])
