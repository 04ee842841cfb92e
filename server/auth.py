"""Who may talk to `serve --transport http`: the bind rule, the Host/Origin allow-list, the bearer token.

On loopback the SDK's DNS-rebinding check is enough on its own: only local processes reach the port,
and a web page cannot pose as 127.0.0.1. Anywhere else a token from CLI_COUNCIL_TOKEN and a non-empty
`[server] allowed_roots` are required, because whoever reaches the port can make agents edit
repositories (the engine refuses repos outside the roots).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Sequence
from pathlib import Path

from mcp.server.transport_security import TransportSecuritySettings
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.config import ConfigError, config_path

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, allowed_roots: Sequence[str] = ()) -> None:
    """Refuse to serve beyond this machine without both a token (who may call) and `[server] allowed_roots`
    (which repositories those callers may point agents at)."""
    if is_loopback(host):
        return
    missing = []
    if not token:
        missing.append("CLI_COUNCIL_TOKEN to a long random secret (clients then send `Authorization: Bearer <token>`)")
    if not allowed_roots:
        missing.append(f'`allowed_roots = ["~/code"]` under [server] in {config_path()} (the directories whose '
                       "repositories clients may use)")
    if missing:
        raise ConfigError(f"refusing to serve on {host!r}: anyone who reaches the port could run agents on your "
                          f"repositories. Set {' and '.join(missing)}, or serve on --host 127.0.0.1")
    for root in allowed_roots:
        if not Path(root).expanduser().is_absolute():  # "" or "code" would mean the server's working directory
            raise ConfigError(f"refusing to serve on {host!r}: [server] allowed_roots entry {root!r} in "
                              f"{config_path()} is not an absolute directory; write it like \"~/code\" or \"/srv/repos\"")


def security_settings(host: str) -> TransportSecuritySettings:
    """Host/Origin allow-list against DNS rebinding: loopback names, plus the bound name if it is one.

    A wildcard bind (0.0.0.0, ::) cannot know the names clients will use, so the check is off there
    and the bearer token (which check_bind makes mandatory) is what keeps a rebinding page out.
    """
    if host in WILDCARDS:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    names = list(LOOPBACK_NAMES)
    if not is_loopback(host):
        names.append(f"[{host}]" if ":" in host else host)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[h for n in names for h in (n, f"{n}:*")],
        allowed_origins=[o for n in names for o in (f"http://{n}", f"http://{n}:*", f"https://{n}", f"https://{n}:*")],
    )


class BearerToken:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>`, else 401; except
    paths for which `own_auth(path)` is true: their routes check the token themselves (the dashboard)."""

    def __init__(self, app: ASGIApp, token: str, own_auth: Callable[[str], bool] = lambda path: False):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.own_auth = own_auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.own_auth(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                # A JSON-RPC error body: MCP clients show its message instead of a bare "error response".
                response = JSONResponse(
                    {"jsonrpc": "2.0", "id": None, "error": {
                        "code": -32001, "message": "unauthorized (401): send Authorization: Bearer <CLI_COUNCIL_TOKEN> "
                                                   "with the token the server was started with"}},
                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="cli-council"'})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def protect(app: ASGIApp, token: str | None, own_auth: Callable[[str], bool] = lambda path: False) -> ASGIApp:
    return BearerToken(app, token, own_auth) if token else app
