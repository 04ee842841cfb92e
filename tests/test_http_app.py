"""build_http_app served by uvicorn in this process on 127.0.0.1: a route added beside /mcp reaches the
very Engine the MCP tools use (it lists the task an MCP client just submitted), and the bearer token
and Host check guard that route as they guard /mcp."""

from __future__ import annotations

import json

import anyio
import httpx
import httpx2
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from engine.config import parse_config
from server import http_transport
from server.app import build_http_app, routes
from tests.conftest import fake

TOKEN = "token-for-the-http-app"


def with_hosted(get_engine, token, host):
    """The default routes plus one that shows which tasks the running Engine hosts."""
    async def hosted(_request: Request) -> JSONResponse:
        return JSONResponse(sorted(get_engine()._hosted))

    return [*routes(get_engine, token, host), Route("/hosted", hosted)]


async def test_a_route_beside_mcp_reaches_the_engine_the_tools_use(council_home, repo):
    cfg = parse_config({"engine": {"kill_grace_s": 1}, "agents": {"slow": fake("--sleep", "30")}})
    app = build_http_app("127.0.0.1", TOKEN, config=cfg, home=council_home, extra_routes=with_hosted)
    sock = http_transport.bind("127.0.0.1", 0)[0]
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(30):
            while not server.started:
                await anyio.sleep(0.02)
        try:
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                assert (await http.get("/hosted")).status_code == 401
                assert (await http.get("/hosted", headers={**auth, "Host": "evil.example"})).status_code == 421
                assert (await http.get("/hosted", headers=auth)).json() == []
                async with httpx2.AsyncClient(headers=auth) as mcp_http:
                    async with Client(streamable_http_client(f"{base}/mcp", http_client=mcp_http)) as client:
                        r = await client.call_tool("submit_task", {"repo": str(repo), "prompt": "wait",
                                                                   "agents": ["slow"]})
                        task_id = r.structured_content["task_id"]
                        assert (await http.get("/hosted", headers=auth)).json() == [task_id]
                        metrics = await http.get("/metrics", headers=auth)
                        assert 'council_tasks_total{state="running"} 1.0' in metrics.text or \
                               'council_tasks_total{state="queued"} 1.0' in metrics.text
                        # The dashboard rides on the same Engine: it reads without the token, and
                        # refuses to change anything without it.
                        assert (await http.get("/")).status_code == 200
                        listed = (await http.get("/api/tasks")).json()
                        assert task_id in json.dumps(listed)
                        assert (await http.post(f"/api/tasks/{task_id}/cancel")).status_code == 401
                        assert (await http.get("/metrics")).status_code == 401
                        await client.call_tool("cancel_task", {"task_id": task_id})
        finally:
            server.should_exit = True
