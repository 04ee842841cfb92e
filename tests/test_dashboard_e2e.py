"""The dashboard in a real headless browser (Debian's chromium driven by Playwright): the task list, a task page
whose log grows while a fake agent runs, agent output that tries to be HTML shown as text, the final state, a
diff, and a merge after signing in with the token. Screenshots are saved for people to look at: under
$CLI_COUNCIL_ARTIFACTS when set, else the test's tmp dir (the path is printed).

Skips only when chromium (/usr/bin/chromium) or the playwright package is missing here; `.ci/install-browser`
installs both, so CI runs it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engine.models import TaskState

from tests.conftest import fake, git
from tests.test_dashboard import HOSTILE, TOKEN, gated, serving

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: install it with `bash .ci/install-browser` (apt-get install chromium)",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.async_api", reason="the playwright package is missing: "
                                 "`pip install -e '.[test]'` or `bash .ci/install-browser` installs it")


def artifacts_dir(tmp_path: Path) -> Path:
    where = Path(os.environ.get("CLI_COUNCIL_ARTIFACTS") or tmp_path / "artifacts")
    where.mkdir(parents=True, exist_ok=True)
    return where


async def test_a_browser_watches_a_task_run_and_merges_its_best_attempt(make_engine, repo, tmp_path):
    from server import dashboard

    expect = playwright.expect
    shots = artifacts_dir(tmp_path)
    release = tmp_path / "release"
    agents = {"slow": gated(release), "broken": fake("--exit", "3")}
    dialogs, problems = [], []
    async with make_engine(agents) as engine, serving(dashboard.app(engine, TOKEN)) as url:
        task = await engine.submit(str(repo), "make result.txt", agents=["slow", "broken"])
        async with playwright.async_playwright() as p:
            browser = await p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000})
            try:
                page = browser.pages[0] if browser.pages else await browser.new_page()

                async def on_dialog(dialog):
                    dialogs.append((dialog.type, dialog.message))
                    await (dialog.accept() if dialog.type == "confirm" else dialog.dismiss())

                page.on("dialog", on_dialog)
                page.on("console", lambda msg: msg.type == "error" and problems.append(msg.text))
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))

                await page.goto(url + "/")
                row = page.locator(f"tr[data-task='{task.task_id}']")
                await expect(row).to_be_visible(timeout=WAIT_MS)
                await expect(row.locator(".state")).to_have_text("running", timeout=WAIT_MS)
                await page.screenshot(path=str(shots / "dashboard-list.png"), full_page=True)
                await row.locator("a").click()
                await expect(page).to_have_url(f"{url}/tasks/{task.task_id}")

                log = page.locator("#log")
                await expect(log.locator(".text", has_text="step 1")).to_have_count(1, timeout=WAIT_MS)
                # the agent waits for us: the line arrived while it runs, and the page says so
                assert (await engine.get(task.task_id)).state == TaskState.running
                await expect(page.locator("#state .state")).to_have_text("running")
                await expect(page.locator("#live")).to_have_text("live")
                await expect(log.locator(".text", has_text=HOSTILE)).to_have_count(1)
                assert await page.locator("#log script, #log img, #attempts script, #attempts img").count() == 0
                await page.screenshot(path=str(shots / "dashboard-running.png"), full_page=True)

                release.touch()
                await expect(page.locator("#state .state")).to_have_text("succeeded", timeout=WAIT_MS)
                await expect(log.locator(".text", has_text="finished")).to_have_count(1, timeout=WAIT_MS)
                await expect(page.locator("#live")).to_have_text("finished", timeout=WAIT_MS)
                slow = page.locator("article.attempt[data-agent='slow']")
                broken = page.locator("article.attempt[data-agent='broken']")
                await expect(slow.locator(".best-badge")).to_have_text("best")
                await expect(slow).to_contain_text("1 file, +1 −0")
                await expect(broken.locator("header .state")).to_have_text("failed")
                await expect(broken).to_contain_text("Exit code3")
                await expect(page.locator("#best")).to_contain_text("Best: slow")
                await expect(page.locator(".merge")).to_have_count(0)  # not signed in: nothing to click

                await slow.locator(".show-diff").click()
                await expect(page.locator("#diff")).to_contain_text("+from the gated agent", timeout=WAIT_MS)
                await page.screenshot(path=str(shots / "dashboard-finished.png"), full_page=True)

                await page.fill("#token", TOKEN)
                await page.click("#signin button")
                await expect(page.locator("#who")).to_have_text("signed in", timeout=WAIT_MS)
                await slow.locator(".merge").click()
                await expect(page.locator("#notice")).to_contain_text("merged: squash of council/", timeout=WAIT_MS)
                await expect(page.locator("#state .state")).to_have_text("merged", timeout=WAIT_MS)
                await page.screenshot(path=str(shots / "dashboard-merged.png"), full_page=True)
                assert "Bearer" not in page.url and TOKEN not in page.url
            finally:
                await browser.close()
    print(f"dashboard screenshots: {shots}")
    assert git(repo, "show", "main:result.txt") == "from the gated agent"
    assert [kind for kind, _ in dialogs] == ["confirm"], dialogs  # the merge's question; never an alert
    assert problems == [], problems  # no script error, no Content-Security-Policy violation
    for name in ("list", "running", "finished", "merged"):
        assert (shots / f"dashboard-{name}.png").stat().st_size > 10_000
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
