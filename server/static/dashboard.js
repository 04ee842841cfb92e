"use strict";
// The cli-council dashboard. Everything the server sends is data (agents' output above all): it reaches
// the page through textContent and attribute values only, never innerHTML. The token a user signs in
// with stays in this tab's sessionStorage and travels only as an Authorization header.

const TOKEN_KEY = "cli-council-token";
const MAX_LOG_LINES = 5000;
const ACTIVE = new Set(["queued", "running"]);
const auth = { token: sessionStorage.getItem(TOKEN_KEY), required: true, ok: false, changed: () => {} };

function h(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

const $ = (id) => document.getElementById(id);
const token = (s) => String(s).replace(/[^a-z0-9_-]/gi, "");  // for class names built from states
const authHeaders = () => (auth.token ? { Authorization: "Bearer " + auth.token } : {});
const canAct = () => auth.ok;

function setLive(text, ok) {
  const live = $("live");
  live.textContent = text;
  live.classList.toggle("offline", !ok);
}

function money(x) { return x === null || x === undefined ? "–" : "$" + Number(x).toFixed(x >= 1 ? 2 : 4); }
function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}
function age(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 86400) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}
function stateBadge(state) { return h("span", { class: "state state-" + token(state), text: state }); }

async function getJSON(url) {
  const r = await fetch(url, { headers: authHeaders(), cache: "no-store" });
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON: the status says enough */ }
  if (!r.ok) throw new Error((body && body.error) || r.status + " " + r.statusText);
  return body;
}

async function post(url) {
  const r = await fetch(url, { method: "POST", headers: authHeaders(), credentials: "same-origin" });
  let body = null;
  try { body = await r.json(); } catch (e) { /* idem */ }
  if (!r.ok) throw new Error((body && body.error) || r.status + " " + r.statusText);
  return body;
}

// signing in

async function checkAuth() {
  try {
    const state = await getJSON("/api/auth");
    auth.required = state.token_required;
    auth.ok = state.authorized;
    if (auth.token && !state.authorized) {
      sessionStorage.removeItem(TOKEN_KEY);
      auth.token = null;
      $("token").setCustomValidity("the server does not accept this token");
      $("token").reportValidity();
    }
  } catch (e) {
    auth.ok = false;
  }
  const signedIn = auth.required && auth.ok;
  $("signin").hidden = !auth.required || auth.ok;
  $("who").hidden = !signedIn;
  $("who").textContent = signedIn ? "signed in" : "";
  $("signout").hidden = !signedIn;
  auth.changed();
}

function setupAuth() {
  $("token").addEventListener("input", () => $("token").setCustomValidity(""));
  $("signin").addEventListener("submit", async (ev) => {
    ev.preventDefault();  // the token never goes into a URL
    const value = $("token").value.trim();
    if (!value) return;
    auth.token = value;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    await checkAuth();
  });
  $("signout").addEventListener("click", async () => {
    sessionStorage.removeItem(TOKEN_KEY);
    auth.token = null;
    await checkAuth();
  });
  return checkAuth();
}

// the task list

async function listPage() {
  const tbody = document.querySelector("#tasks tbody");
  async function refresh() {
    let tasks;
    try {
      tasks = (await getJSON("/api/tasks?limit=100")).tasks;
    } catch (e) {
      setLive("offline: " + e.message, false);
      return;
    }
    setLive("live", true);
    $("empty").hidden = tasks.length > 0;
    tbody.replaceChildren(...tasks.map((t) => h("tr", { "data-task": t.task_id, class: "state-row-" + token(t.state) },
      h("td", {}, h("a", { href: "/tasks/" + encodeURIComponent(t.task_id), text: t.title || "(no prompt)" }),
        h("div", { class: "muted small", text: t.task_id + " · " + t.repo })),
      h("td", {}, stateBadge(t.state)),
      h("td", { text: t.tier || "–" }),
      h("td", {}, ...t.attempts.map((a) => h("span", { class: "chip state-" + token(a.state), title: a.state,
                                                        text: a.agent }))),
      h("td", { text: t.best || "–" }),
      h("td", { class: "num", text: money(t.total_cost_usd) }),
      h("td", { class: "num", title: t.created_at, text: age(t.created_at) }))));
  }
  await refresh();
  setInterval(refresh, 2000);
}

// one task

function taskPage() {
  const taskId = decodeURIComponent(location.pathname.split("/")[2] || "");
  const api = "/api/tasks/" + encodeURIComponent(taskId);
  const log = $("log");
  let task = null;

  function notice(text, bad) {
    $("notice").textContent = text;
    $("notice").classList.toggle("bad", !!bad);
  }

  function attemptCard(a) {
    const rows = [];
    const row = (name, value, cls) => rows.push(h("dt", { text: name }), h("dd", { class: cls, text: value }));
    const running = a.state === "running" && a.started_at;
    const dur = h("dd", { class: running ? "ticking" : null, "data-started": running ? a.started_at : null,
                          text: running ? seconds((Date.now() - Date.parse(a.started_at)) / 1000) : seconds(a.duration_s) });
    rows.push(h("dt", { text: "Duration" }), dur);
    row("Cost", money(a.cost_usd));
    row("Tokens", a.tokens_in === null && a.tokens_out === null ? "–"
      : (a.tokens_in ?? "?") + " in / " + (a.tokens_out ?? "?") + " out");
    row("Changes", a.files_changed + " file" + (a.files_changed === 1 ? "" : "s") + ", +" + a.insertions + " −" + a.deletions);
    if (a.check) {
      row("Check", (a.check.passed ? "passed" : "failed") + " (" + (a.check.error || "exit " + a.check.exit_code) + "): "
        + a.check.command, a.check.passed ? "good" : "bad");
    }
    if (a.retries) row("Retries", String(a.retries));
    if (a.exit_code !== null && a.exit_code !== undefined) row("Exit code", String(a.exit_code));
    if (a.error) row("Error", a.error.kind + ": " + a.error.message, "bad");
    for (const [k, v] of Object.entries(a)) {  // a review's scores, when the engine records any
      if (/score|review/i.test(k) && v !== null && v !== undefined) row(k, typeof v === "string" ? v : JSON.stringify(v));
    }
    if (a.summary) row("Summary", a.summary);

    const actions = h("div", { class: "actions" });
    const finished = !ACTIVE.has(a.state);
    if (finished && a.files_changed > 0 && a.branch && !task.discarded_at) {
      actions.append(h("button", { type: "button", class: "show-diff", onclick: () => showDiff(a.agent), text: "Diff" }));
      if (canAct() && !ACTIVE.has(task.state) && task.state !== "merged") {
        actions.append(h("button", { type: "button", class: "merge", onclick: () => merge(a.agent),
                                     text: "Merge into " + (task.into || "…") }));
      }
    }
    const best = task.best === a.agent;
    return h("article", { class: "attempt" + (best ? " is-best" : ""), "data-agent": a.agent },
      h("header", {}, h("h3", { text: a.agent }), stateBadge(a.state),
        best ? h("span", { class: "badge best-badge", text: "best" }) : null,
        a.stage ? h("span", { class: "badge", text: "escalation" }) : null),
      h("dl", {}, ...rows), actions);
  }

  function render() {
    const first = (task.prompt.trim().split("\n")[0] || "(no prompt)").slice(0, 200);
    document.title = first + " · cli-council";
    $("title").textContent = first;
    $("state").replaceChildren(stateBadge(task.state));
    const bits = [task.task_id, task.repo, task.into ? "into " + task.into : "detached",
                  "tier " + (task.tier || "–") + (task.tier_reason ? " (" + task.tier_reason + ")" : ""),
                  "cost " + money(task.total_cost_usd), "created " + age(task.created_at) + " ago"];
    if (task.check) bits.push("check: " + task.check);
    if (task.merge_commit) bits.push("merged as " + task.merge_commit.slice(0, 12));
    $("meta").textContent = bits.join(" · ");
    $("best").textContent = task.best ? "Best: " + task.best + (task.best_reason ? ". Why: " + task.best_reason : "")
      : task.best_reason ? "No best attempt: " + task.best_reason : "";
    $("problem").hidden = !task.error;
    $("problem").textContent = task.error ? task.error.kind + ": " + task.error.message : "";
    $("warnings").replaceChildren(...task.warnings.map((w) => h("li", { text: w })));
    $("prompt").textContent = task.prompt;
    $("cancel").hidden = !(canAct() && ACTIVE.has(task.state));
    $("attempts").replaceChildren(...task.attempts.map(attemptCard));
    const filter = $("agent-filter");
    const known = new Set([...filter.options].map((o) => o.value));
    for (const name of [...task.attempts.map((a) => a.agent), "council"]) {
      if (!known.has(name)) filter.append(h("option", { value: name, text: name }));
    }
  }

  function appendLines(lines) {
    const only = $("agent-filter").value;
    for (const ln of lines) {
      log.append(h("div", { class: "line stream-" + token(ln.stream), "data-agent": ln.agent, "data-seq": ln.seq,
                            hidden: !!only && ln.agent !== only, title: ln.ts },
        h("span", { class: "who", text: ln.agent + (ln.stream === "stdout" || ln.stream === ln.agent ? "" : "/" + ln.stream) }),
        h("span", { class: "text", text: ln.text })));
    }
    while (log.childElementCount > MAX_LOG_LINES) log.firstElementChild.remove();
    if ($("follow").checked) log.scrollTop = log.scrollHeight;
  }

  async function refetch() {
    try {
      task = await getJSON(api);
      render();
    } catch (e) {
      notice(e.message, true);
    }
  }

  async function showDiff(agent) {
    $("diff-section").hidden = false;
    $("diff-title").textContent = agent + "'s diff";
    $("diff-files").textContent = "loading…";
    $("diff").replaceChildren();
    let diff;
    try {
      diff = await getJSON(api + "/attempts/" + encodeURIComponent(agent) + "/diff");
    } catch (e) {
      $("diff-files").textContent = e.message;
      return;
    }
    $("diff-files").textContent = diff.files.map((f) => f.path + (f.binary ? " (binary)" : " +" + f.insertions + " −" + f.deletions))
      .join(", ") + (diff.truncated ? " (patch cut short)" : "");
    $("diff").replaceChildren(...diff.patch.split("\n").map((line) => {
      const cls = line.startsWith("+++") || line.startsWith("---") ? "meta" : line.startsWith("+") ? "add"
        : line.startsWith("-") ? "del" : line.startsWith("@@") ? "hunk" : line.startsWith("diff ") ? "meta" : "";
      return h("span", { class: "dl " + cls, text: line + "\n" });
    }));
    $("diff-section").scrollIntoView({ block: "start" });
  }

  async function merge(agent) {
    if (!confirm("Merge " + agent + "'s attempt into " + (task.into || "the task's branch") + " in " + task.repo + "?")) return;
    notice("merging…");
    try {
      const result = await post(api + "/attempts/" + encodeURIComponent(agent) + "/merge");
      notice((result.merged ? "merged: " : "not merged: ") + result.message, !result.merged);
    } catch (e) {
      notice("merge refused: " + e.message, true);
    }
    await refetch();
  }

  $("cancel").addEventListener("click", async () => {
    if (!confirm("Cancel every running attempt of this task?")) return;
    notice("cancelling…");
    try {
      const t = await post(api + "/cancel");
      notice("task " + t.state);
    } catch (e) {
      notice("cancel refused: " + e.message, true);
    }
    await refetch();
  });

  $("agent-filter").addEventListener("change", () => {
    const only = $("agent-filter").value;
    for (const line of log.children) line.hidden = !!only && line.dataset.agent !== only;
  });

  setInterval(() => {
    for (const dd of document.querySelectorAll("dd.ticking")) {
      dd.textContent = seconds((Date.now() - Date.parse(dd.dataset.started)) / 1000);
    }
  }, 1000);

  auth.changed = () => { if (task) render(); };

  (async () => {
    try {
      task = await getJSON(api);
    } catch (e) {
      $("title").textContent = e.message;
      setLive("not found", false);
      return;
    }
    render();
    const events = new EventSource(api + "/events");
    events.onopen = () => setLive("live", true);
    events.onerror = () => { if (events.readyState !== EventSource.CLOSED) setLive("reconnecting…", false); };
    events.addEventListener("lines", (ev) => appendLines(JSON.parse(ev.data).lines));
    events.addEventListener("task", (ev) => { task = JSON.parse(ev.data); render(); });
    events.addEventListener("end", () => { events.close(); setLive("finished", true); });
    events.addEventListener("gone", (ev) => { events.close(); setLive("gone", false); notice(JSON.parse(ev.data).error, true); });
  })();
}

document.addEventListener("DOMContentLoaded", async () => {
  await setupAuth();
  if (document.body.dataset.page === "task") taskPage();
  else listPage();
});
