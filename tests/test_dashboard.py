"""The dashboard over real HTTP: its pages, JSON API and event stream served by uvicorn on 127.0.0.1 (in this
process, beside a real Engine running fake agents), the token and same-origin rules for cancel and merge,
hostile requests, and `cli-council dashboard` following tasks another process hosts.

A gated agent prints its lines, then waits for a file the test creates: "running" is a state the test
holds, not a moment it hopes to catch. Every wait has its own bound (fail_after)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import uvicorn

from engine.models import TaskState
from server import dashboard, http_transport

from tests.conftest import fake, git
from tests.test_transport_http import started

HOSTILE = "<script>alert(1)</script> <img src=x onerror=alert(2)>"
GATED = (
    "import os, sys, time\n"
    "release = sys.argv[1]\n"
    f"print({HOSTILE!r}, flush=True)\n"
    "print('step 1', flush=True)\n"
    "deadline = time.monotonic() + 120\n"
    "while not os.path.exists(release) and time.monotonic() < deadline:\n"
    "    time.sleep(0.05)\n"
    "open('result.txt', 'w').write('from the gated agent\\n')\n"
    "print('finished', flush=True)\n"
)
TOKEN = "dashboard-test-token-0123456789"


def gated(release: Path) -> dict:
    """An agent that prints HOSTILE and `step 1`, waits until `release` exists, then writes result.txt."""
    return {"kind": "command", "argv": [sys.executable, "-c", GATED, str(release), "{prompt}"]}


@asynccontextmanager
async def serving(app):
    """`app` on a real uvicorn (the dashboard's own timed h11 protocol) on a free 127.0.0.1 port; yields its URL."""
    sockets = http_transport.bind("127.0.0.1", 0)
    port = sockets[0].getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=http_transport.timed_h11(10, 30), ws="none", lifespan="on",
                                           log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=sockets))
        with anyio.fail_after(20):
            while not server.started:
                await anyio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True


@asynccontextmanager
async def dashboard_on(engine, token=TOKEN):
    async with serving(dashboard.app(engine, token)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield http


async def sse(response: httpx.Response):
    """The (event, data, id) of each event a text/event-stream response carries."""
    event, data, event_id = "message", [], None
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data)), event_id
            event, data, event_id = "message", [], None
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line.startswith("id: "):
            event_id = line[4:]


async def until_running(engine, task_id: str) -> None:
    with anyio.fail_after(30):
        while (await engine.get(task_id)).state != TaskState.running:
            await anyio.sleep(0.05)


async def test_pages_and_api_are_read_only_without_the_token_and_agent_output_stays_data(make_engine, repo):
    agents = {"loud": fake("--write", "out.txt=" + HOSTILE), "quiet": fake("--exit", "1")}
    async with make_engine(agents) as engine, dashboard_on(engine) as http:
        task = await engine.submit(str(repo), "say " + HOSTILE, agents=["loud", "quiet"])
        task = await engine.wait(task.task_id, 60)
        assert task.state == TaskState.succeeded and task.best == "loud", task

        for path in ("/", f"/tasks/{task.task_id}"):
            r = await http.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
            # the pages are static: no task data is ever written into HTML
            assert "alert" not in r.text and "/static/dashboard.js" in r.text
            assert "default-src 'self'" in r.headers["content-security-policy"] and "unsafe" not in \
                r.headers["content-security-policy"]
            assert r.headers["x-content-type-options"] == "nosniff"
        for asset, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
            r = await http.get(f"/static/{asset}")
            assert r.status_code == 200 and kind in r.headers["content-type"]
            assert r.headers["x-content-type-options"] == "nosniff"
        script = (await http.get("/static/dashboard.js")).text
        assert "textContent" in script and not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write", script)

        listed = (await http.get("/api/tasks")).json()["tasks"]
        assert [t["task_id"] for t in listed] == [task.task_id]
        assert listed[0]["state"] == "succeeded" and {a["agent"] for a in listed[0]["attempts"]} == {"loud", "quiet"}

        r = await http.get(f"/api/tasks/{task.task_id}")
        assert r.headers["content-type"] == "application/json" and r.headers["x-content-type-options"] == "nosniff"
        shown = r.json()
        assert shown["prompt"] == "say " + HOSTILE and shown["best"] == "loud" and shown["best_reason"]
        loud = next(a for a in shown["attempts"] if a["agent"] == "loud")
        assert loud["state"] == "succeeded" and loud["files_changed"] == 1 and loud["duration_s"] is not None

        diff = (await http.get(f"/api/tasks/{task.task_id}/attempts/loud/diff")).json()
        assert [f["path"] for f in diff["files"]] == ["out.txt"] and f"+{HOSTILE}" in diff["patch"]
        r = await http.get(f"/api/tasks/{task.task_id}/attempts/quiet/diff")
        assert r.status_code == 400 and "left no changes" in r.json()["error"]

        assert (await http.get("/api/auth")).json() == {"token_required": True, "authorized": False}
        signed = await http.get("/api/auth", headers={"Authorization": f"Bearer {TOKEN}"})
        assert signed.json() == {"token_required": True, "authorized": True}

        # the log, through the event stream of a finished task: every line, the task, then the end
        async with http.stream("GET", f"/api/tasks/{task.task_id}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [e async for e in sse(r)]
    kinds = [e for e, _, _ in events]
    assert kinds[0] == "task" and kinds[-1] == "end" and "lines" in kinds, kinds
    texts = [ln["text"] for e, d, _ in events if e == "lines" for ln in d["lines"]]
    assert any(HOSTILE in t for t in texts), texts


async def test_event_stream_follows_a_running_task_and_resumes_where_it_left_off(make_engine, repo, tmp_path):
    release = tmp_path / "release"
    async with make_engine({"slow": gated(release)}) as engine, dashboard_on(engine) as http:
        task = await engine.submit(str(repo), "work slowly", agents=["slow"])
        with anyio.fail_after(60):
            async with http.stream("GET", f"/api/tasks/{task.task_id}/events") as r:
                seen, states, resume = [], [], None
                async for event, data, event_id in sse(r):
                    if event == "task":
                        states.append(data["state"])
                    if event == "lines":
                        seen += [ln["text"] for ln in data["lines"]]
                        assert event_id == str(data["cursor"])
                        if "step 1" in seen and resume is None:
                            # the line arrived while the agent still waits for us: it is live, not replayed
                            assert (await engine.get(task.task_id)).state == TaskState.running
                            resume = event_id
                            release.touch()
                    if event == "end":
                        assert data == {"state": "succeeded"}
                        break
        assert HOSTILE in seen and seen.index("step 1") < seen.index("finished")
        assert states[-1] == "succeeded" and "running" in states
        # a reconnecting EventSource sends the last id it saw: only what came after it is sent again
        async with http.stream("GET", f"/api/tasks/{task.task_id}/events", headers={"Last-Event-ID": resume}) as r:
            again = [ln["text"] for e, d, _ in [e async for e in sse(r)] if e == "lines" for ln in d["lines"]]
        assert "finished" in again and "step 1" not in again and HOSTILE not in again


async def test_cancel_and_merge_need_the_token_and_the_page_s_own_origin(make_engine, repo, tmp_path):
    release = tmp_path / "release"
    agents = {"writer": fake("--write", "feature.txt=new feature"), "slow": gated(release)}
    async with make_engine(agents) as engine, dashboard_on(engine) as http:
        done = await engine.wait((await engine.submit(str(repo), "add a feature", agents=["writer"])).task_id, 60)
        running = await engine.submit(str(repo), "take your time", agents=["slow"])
        await until_running(engine, running.task_id)
        merge, cancel = f"/api/tasks/{done.task_id}/attempts/writer/merge", f"/api/tasks/{running.task_id}/cancel"
        own = {"Origin": str(http.base_url).rstrip("/"), "Sec-Fetch-Site": "same-origin"}
        bearer = {"Authorization": f"Bearer {TOKEN}"}

        for url in (merge, cancel):
            r = await http.post(url, headers=own)
            assert r.status_code == 401 and "token" in r.json()["error"], r.text
            assert (await http.post(url, headers={**own, "Authorization": "Bearer wrong"})).status_code == 401
            assert (await http.post(url, headers={**own, "Authorization": TOKEN})).status_code == 401
            # the right token from another site's page (the browser names the site): refused before anything
            for foreign in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                            {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
                r = await http.post(url, headers={**bearer, **foreign})
                assert r.status_code == 403, (foreign, r.text)
            assert (await http.get(url)).status_code == 405  # no change ever comes from a GET
        assert (await engine.get(running.task_id)).state == TaskState.running
        assert (await engine.get(done.task_id)).state == TaskState.succeeded
        assert "feature.txt" not in git(repo, "ls-files")

        r = await http.post(merge + "?dry_run=1", headers={**bearer, **own})
        assert r.status_code == 200 and r.json()["dry_run"] and not r.json()["merged"], r.text
        r = await http.post(merge, headers={**bearer, **own})
        assert r.status_code == 200 and r.json()["merged"] is True, r.text
        assert git(repo, "show", "main:feature.txt") == "new feature"
        r = await http.post(merge, headers={**bearer, **own})
        assert r.status_code == 409 and "already merged" in r.json()["error"]

        r = await http.post(cancel, headers=bearer)  # a script (no Origin, no Sec-Fetch-Site) with the token
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        assert (await engine.get(running.task_id)).state == TaskState.cancelled


async def test_without_a_token_the_loopback_page_acts_but_other_sites_still_cannot(make_engine, repo, tmp_path):
    release = tmp_path / "release"
    async with make_engine({"slow": gated(release)}) as engine, dashboard_on(engine, token=None) as http:
        assert (await http.get("/api/auth")).json() == {"token_required": False, "authorized": True}
        task = await engine.submit(str(repo), "take your time", agents=["slow"])
        await until_running(engine, task.task_id)
        cancel = f"/api/tasks/{task.task_id}/cancel"
        r = await http.post(cancel, headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        assert (await engine.get(task.task_id)).state == TaskState.running
        r = await http.post(cancel, headers={"Origin": str(http.base_url).rstrip("/"), "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 200 and r.json()["state"] == "cancelled"


async def test_hostile_requests_get_clear_refusals_and_the_server_keeps_serving(make_engine, repo):
    async with make_engine({"one": fake()}) as engine, dashboard_on(engine) as http:
        task = await engine.wait((await engine.submit(str(repo), "x", agents=["one"])).task_id, 60)
        # a page on a rebinding name (evil.example resolving to 127.0.0.1) cannot read anything
        for path in ("/", "/api/tasks", f"/api/tasks/{task.task_id}", "/static/dashboard.js",
                     f"/api/tasks/{task.task_id}/events"):
            r = await http.get(path, headers={"Host": "evil.example"})
            assert r.status_code == 421, path
        assert (await http.get("/api/tasks", headers={"Host": "localhost"})).status_code == 200
        cases = [
            ("/api/tasks/nothex", 404), ("/api/tasks/0123456789ab", 404), (f"/api/tasks/{task.task_id}x", 404),
            ("/api/tasks/0123456789ab/events", 404), (f"/api/tasks/{task.task_id}/attempts/nobody/diff", 400),
            (f"/api/tasks/{task.task_id}/attempts/{'a' * 5000}/diff", 400),
            ("/api/tasks?limit=-1", 400), ("/api/tasks?limit=" + "9" * 5000, 400), ("/api/tasks?limit=0", 200),
            (f"/api/tasks/{task.task_id}/events?cursor=99999999999999999999", 400),
            (f"/api/tasks/{task.task_id}/events?cursor=abc", 400),
            ("/static/../dashboard.py", 404), ("/static/%2e%2e/dashboard.py", 404),
        ]
        for path, status in cases:
            r = await http.get(path)
            assert r.status_code == status, (path[:80], r.status_code, r.text[:200])
            if r.headers.get("content-type") == "application/json" and status >= 400:
                assert r.json()["error"], path
        # "²" is a digit to str.isdigit, not to int()
        r = await http.get(f"/api/tasks/{task.task_id}/events", headers={"Last-Event-ID": b"\xb2"})
        assert r.status_code == 400
        assert (await http.get(f"/api/tasks/{task.task_id}/events?cursor=%C2%B2")).status_code == 400
        assert (await http.get(f"/api/tasks/{task.task_id}")).json()["state"] == task.state


def test_dashboard_command_follows_a_task_another_process_hosts_and_cancels_it(tmp_path, repo):
    """`cli-council dashboard` starts while a task of another process runs: it must not mark it interrupted
    (its host is alive), shows it live, and its cancel reaches the host through the store."""
    release = tmp_path / "release"
    host_script = tmp_path / "host.py"
    host_script.write_text(
        "import anyio, sys\n"
        "from engine.config import parse_config\n"
        "from engine.engine import Engine\n"
        "async def main():\n"
        f"    cfg = parse_config({{'agents': {{'slow': {gated(release)!r}}}, 'engine': {{'kill_grace_s': 1}}}})\n"
        "    async with Engine(cfg, warm_pool=False) as engine:\n"
        f"        task = await engine.submit({str(repo)!r}, 'hosted elsewhere', agents=['slow'])\n"
        "        print(task.task_id, flush=True)\n"
        "        task = await engine.wait(task.task_id, 120)\n"
        "        print(task.state, flush=True)\n"
        "anyio.run(main)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("CLI_COUNCIL_TOKEN", None)
    host = subprocess.Popen([sys.executable, str(host_script)], cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    try:
        task_id = host.stdout.readline().strip()
        assert len(task_id) == 12, task_id
        cmd = [sys.executable, "-m", "server.cli", "dashboard", "--port", "0"]
        with started(cmd, env, r"dashboard on http://127\.0\.0\.1:(\d+)/") as (_, m):
            url = f"http://127.0.0.1:{m.group(1)}"
            with httpx.Client(base_url=url, timeout=30) as http:
                with http.stream("GET", f"/api/tasks/{task_id}/events") as r:
                    seen, state = [], None
                    for line in r.iter_lines():
                        if line.startswith("data: ") and '"lines"' in line:
                            seen += [ln["text"] for ln in json.loads(line[6:])["lines"]]
                        elif line.startswith("data: ") and '"attempts"' in line:
                            state = json.loads(line[6:])["state"]
                        if "step 1" in seen and state == "running":
                            break
                assert http.get(f"/api/tasks/{task_id}").json()["state"] == "running"
                r = http.post(f"/api/tasks/{task_id}/cancel", headers={"Origin": url})
                assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        assert host.wait(60) == 0 and host.stdout.read().strip() == "cancelled"
    finally:
        release.touch()
        if host.poll() is None:
            host.kill()
        host.wait()


def test_dashboard_command_refuses_a_public_bind_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "CLI_COUNCIL_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "server.cli", "dashboard", "--host", "0.0.0.0", "--port", "0"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "CLI_COUNCIL_TOKEN" in done.stderr, done.stderr


async def test_open_event_streams_are_capped_and_a_closed_one_frees_its_place(make_engine, repo, tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard, "MAX_STREAMS", 2)
    release = tmp_path / "release"
    async with make_engine({"slow": gated(release)}) as engine, dashboard_on(engine) as http:
        task = await engine.submit(str(repo), "take your time", agents=["slow"])
        url = f"/api/tasks/{task.task_id}/events"

        async def first_event(r: httpx.Response) -> str:
            async for event, _, _ in sse(r):
                return event

        with anyio.fail_after(60):
            async with http.stream("GET", url) as one, http.stream("GET", url) as two:
                assert await first_event(one) == await first_event(two) == "task"  # both streams are open
                r = await http.get(url)
                assert r.status_code == 503 and "live views" in r.json()["error"]
            for _ in range(3):  # a closed stream gives its place back (once the server hears it close)
                while True:
                    async with http.stream("GET", url) as again:
                        if again.status_code != 503:
                            assert again.status_code == 200 and await first_event(again) == "task"
                            break
                    await anyio.sleep(0.05)
        release.touch()
