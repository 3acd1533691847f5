// The fleet-ipc admin console: plain JavaScript, no build step, no other origin.
// Every value from the fleet is written with textContent (never as HTML), and the
// Content-Security-Policy forbids inline scripts, so data cannot run as code.
"use strict";

const state = {
  session: null,
  capabilities: null,
  members: [],
  tail: null, // {source, paused, held, count}
  rollout: null, // {key, cells, plan, running}
  rolloutPlan: null, // the last preview's ledger, for the grid
};

const $ = (id) => document.getElementById(id);

// --- building the page without HTML strings ------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function chip(text, className) {
  return el("span", "chip" + (className ? " " + className : ""), text);
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function time(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : "";
}

function pretty(value) {
  return value === undefined ? "" : JSON.stringify(value, null, 2);
}

function showError(node, error) {
  node.textContent = error ? (error.code ? error.code + ": " : "") + error.message : "";
}

// --- the API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || "HTTP " + status);
    this.status = status;
    this.code = (body && body.code) || "HTTP_" + status;
  }
}

async function call(path, body) {
  const init = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    if (state.session && state.session.csrf) init.headers["X-CSRF-Token"] = state.session.csrf;
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401 && path !== "/api/login") {
    showLogin("Your session ended; log in again.");
  }
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch (_) {
    parsed = { message: text };
  }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return { response, body: parsed };
}

function parseData(text) {
  const trimmed = text.trim();
  if (!trimmed) return undefined;
  try {
    return JSON.parse(trimmed);
  } catch (e) {
    throw new ApiError(0, { code: "INVALID_ARGUMENT", message: "data is not JSON: " + e.message });
  }
}

function parseLabels(text) {
  const labels = {};
  for (const part of text.split(",")) {
    const pair = part.trim();
    if (!pair) continue;
    const at = pair.indexOf("=");
    if (at < 1) throw new ApiError(0, { code: "INVALID_ARGUMENT", message: "label " + pair + " is not k=v" });
    labels[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
  }
  return labels;
}

function number(id) {
  const value = parseInt($(id).value, 10);
  return Number.isFinite(value) && value > 0 ? value : 0;
}

// --- session -------------------------------------------------------------------

function showLogin(message) {
  stopTail();
  state.session = null;
  $("app").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-token").focus();
}

function showApp(session) {
  state.session = session;
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("who-sender").textContent = session.authenticated ? session.sender : "unauthenticated (" + session.sender + ")";
  $("who-node").textContent = "node " + session.node;
  if (!$("tail-pattern").value) $("tail-pattern").value = session.app ? session.app + ":>" : ">";
  applyGrants(session.grants);
  show("members");
  loadCapabilities();
  refreshHealthDot();
}

// A token without a grant sees the action disabled (the server refuses it anyway).
// Gather and Rollout ask members as SendMsg does: they need the send grant.
function applyGrants(grants) {
  const rules = [
    [["broadcast-submit"], "broadcast-grant", grants && grants.broadcast, "Broadcast to"],
    [["send-submit", "gather-preview", "rollout-preview"], "send-grant", grants && grants.send, "SendMsg, Gather and Rollout to"],
  ];
  for (const [buttons, hint, list, verb] of rules) {
    const denied = !!grants && (!list || list.length === 0);
    for (const button of buttons) {
      $(button).disabled = denied;
      $(button).dataset.denied = denied ? "1" : "";
    }
    if (!grants) {
      $(hint).textContent = "Unauthenticated server: every action is allowed.";
    } else if (denied) {
      $(hint).textContent = "Your token has no grant to " + verb.split(" ")[0].replace(",", "") + ".";
    } else {
      $(hint).textContent = verb + ": " + list.join(", ");
    }
  }
}

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    const { body } = await call("/api/login", { token: $("login-token").value });
    $("login-token").value = "";
    showApp(body);
  } catch (e) {
    showError($("login-error"), e);
  }
}

async function logout() {
  try {
    await call("/api/logout", {});
  } catch (_) {
    // The session may be gone already.
  }
  showLogin("Logged out.");
}

// --- views ---------------------------------------------------------------------

const loaders = {
  members: loadMembers,
  tail: () => {},
  send: () => {},
  ops: renderCapabilities,
  locks: loadLocks,
  health: loadHealth,
};

function show(view) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === view);
  }
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== "view-" + view;
  }
  loaders[view]();
}

// --- members -------------------------------------------------------------------

async function loadMembers() {
  try {
    const { body } = await call("/api/members");
    state.members = body.members;
    showError($("members-error"), null);
    if (body.truncated) $("members-error").textContent = "The list was cut at the node's limit.";
  } catch (e) {
    showError($("members-error"), e);
    state.members = [];
  }
  renderMembers();
}

function memberText(m) {
  const labels = Object.entries(m.labels || {}).map(([k, v]) => k + "=" + v);
  return [m.id, m.app, m.role, m.tag, m.node, ...labels, m.responder ? "responder" : "watcher"].join(" ").toLowerCase();
}

function renderMembers() {
  const filter = $("members-filter").value.trim().toLowerCase();
  const words = filter ? filter.split(/\s+/) : [];
  const shown = state.members.filter((m) => words.every((w) => memberText(m).includes(w)));
  const responders = shown.filter((m) => m.responder).length;
  const nodes = new Set(shown.map((m) => m.node));
  const apps = new Set(shown.map((m) => m.app));
  $("count-members").textContent = String(state.members.length);

  const summary = $("members-summary");
  clear(summary);
  summary.append(
    stat(shown.length, "members"),
    stat(responders, "responders", "ok"),
    stat(shown.length - responders, "watchers"),
    stat(apps.size, "apps"),
    stat(nodes.size, "nodes"),
  );

  // Grouped by app, then role, then node (the pod or replica it is connected to).
  const groups = new Map();
  for (const m of shown) {
    const key = (m.app || "(no app)") + "\u0000" + (m.role || "(no role)");
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(m);
  }
  const container = $("members-groups");
  clear(container);
  if (shown.length === 0) {
    container.append(el("p", "muted", state.members.length ? "No member matches the filter." : "No members."));
  }
  for (const key of [...groups.keys()].sort()) {
    const [app, role] = key.split("\u0000");
    const list = groups.get(key);
    const group = el("section", "group card");
    const title = el("h3");
    title.append(chip(app, "app"), document.createTextNode(" "), chip(role, "role"), el("span", "count", list.length));
    group.append(title);
    const byNode = new Map();
    for (const m of list) {
      if (!byNode.has(m.node)) byNode.set(m.node, []);
      byNode.get(m.node).push(m);
    }
    for (const node of [...byNode.keys()].sort()) {
      group.append(el("h4", "node", "node " + node));
      for (const m of byNode.get(node).sort((a, b) => a.id.localeCompare(b.id))) {
        group.append(memberRow(m));
      }
    }
    container.append(group);
  }
}

function stat(value, label, className) {
  const box = el("span", "stat" + (className ? " " + className : ""));
  box.append(el("b", null, value), document.createTextNode(" " + label));
  return box;
}

function memberRow(m) {
  const row = el("div", "member");
  row.dataset.member = m.id;
  row.append(el("span", "id", m.id));
  row.append(chip(m.responder ? "responder" : "watcher", m.responder ? "ok" : "watch"));
  if (m.tag) row.append(chip("tag " + m.tag));
  for (const role of m.roles || []) row.append(chip(role, "role"));
  for (const [k, v] of Object.entries(m.labels || {})) row.append(chip(k + "=" + v, "label"));
  const since = el("span", "muted since", "since " + ago(m.connected_ms));
  since.title = m.connected_ms ? new Date(m.connected_ms).toISOString() : "";
  row.append(since);
  return row;
}

// --- live tail -----------------------------------------------------------------

const TAIL_KEEP = 500;

function startTail(event) {
  event.preventDefault();
  stopTail();
  const pattern = $("tail-pattern").value.trim();
  if (!pattern) return;
  const source = new EventSource("/api/tail?pattern=" + encodeURIComponent(pattern));
  state.tail = { source, paused: false, held: [], count: 0, pattern };
  $("tail-status").textContent = "Connecting to " + pattern + "…";
  $("tail-stop").disabled = false;
  $("tail-pause").disabled = false;
  $("tail-pause").textContent = "Pause";
  source.addEventListener("msg", (e) => {
    const msg = JSON.parse(e.data);
    if (msg.op === "ipc:subscribed") {
      setTailStatus("live", "Live: " + pattern + " (via node " + ((msg.data && msg.data.node) || "?") + ")");
      return;
    }
    if (!state.tail) return;
    if (state.tail.paused) {
      state.tail.held.push(msg);
      if (state.tail.held.length > TAIL_KEEP) state.tail.held.shift();
      setTailStatus("paused", "Paused: " + state.tail.held.length + " new message(s) held");
      return;
    }
    addTailRow(msg);
  });
  source.addEventListener("ipc-error", (e) => {
    const error = JSON.parse(e.data);
    source.close();
    $("tail-stop").disabled = true;
    $("tail-pause").disabled = true;
    setTailStatus("error", error.code + ": " + error.message);
  });
  source.onerror = () => {
    if (state.tail && state.tail.source === source) setTailStatus("warn", "Connection lost; reconnecting (resumes from the last message)…");
  };
}

function setTailStatus(kind, text) {
  const status = $("tail-status");
  status.className = "status " + kind;
  status.textContent = text;
}

function stopTail() {
  if (!state.tail) return;
  state.tail.source.close();
  state.tail = null;
  $("tail-stop").disabled = true;
  $("tail-pause").disabled = true;
  setTailStatus("muted", "Stopped.");
}

function togglePause() {
  if (!state.tail) return;
  state.tail.paused = !state.tail.paused;
  $("tail-pause").textContent = state.tail.paused ? "Resume" : "Pause";
  if (!state.tail.paused) {
    for (const msg of state.tail.held) addTailRow(msg);
    state.tail.held = [];
    setTailStatus("live", "Live: " + state.tail.pattern);
  } else {
    setTailStatus("paused", "Paused: new messages are held");
  }
}

function tailMatches(row) {
  const filter = $("tail-filter").value.trim().toLowerCase();
  return !filter || row.dataset.search.includes(filter);
}

function addTailRow(msg) {
  const list = $("tail-list");
  const row = el("button", "msg");
  row.type = "button";
  row.dataset.search = [msg.op, msg.channel, msg.sender, JSON.stringify(msg.data)].join(" ").toLowerCase();
  row.append(el("span", "muted ts", time(msg.ts_ms)));
  row.append(chip(msg.channel, "channel"));
  row.append(el("b", "op", msg.op));
  row.append(el("span", "muted sender", msg.sender));
  const preview = msg.data === null || msg.data === undefined ? "" : JSON.stringify(msg.data);
  row.append(el("code", "preview", preview.length > 160 ? preview.slice(0, 160) + "…" : preview));
  row.addEventListener("click", () => showMessage(msg, row));
  row.hidden = !tailMatches(row);
  list.prepend(row);
  while (list.childElementCount > TAIL_KEEP) list.lastElementChild.remove();
  if (state.tail) state.tail.count += 1;
  $("count-tail").textContent = String(list.childElementCount);
}

function showMessage(msg, row) {
  for (const selected of document.querySelectorAll(".msg.selected")) selected.classList.remove("selected");
  row.classList.add("selected");
  const fields = $("tail-detail-fields");
  clear(fields);
  for (const name of ["op", "channel", "sender", "id", "cursor", "reply_to", "error"]) {
    if (!msg[name]) continue;
    fields.append(el("dt", null, name), el("dd", null, msg[name]));
  }
  fields.append(el("dt", null, "time"), el("dd", null, msg.ts_ms ? new Date(msg.ts_ms).toISOString() : ""));
  for (const [k, v] of Object.entries(msg.headers || {})) fields.append(el("dt", null, "header " + k), el("dd", null, v));
  $("tail-detail-data").textContent = pretty(msg.data);
  $("tail-detail").hidden = false;
}

function filterTail() {
  for (const row of $("tail-list").children) row.hidden = !tailMatches(row);
}

// --- Broadcast and SendMsg ------------------------------------------------------

function resultBox(id, kind, title, detail) {
  const box = $(id);
  clear(box);
  box.className = "result " + kind;
  box.append(el("p", null, title));
  if (detail !== undefined) box.append(el("pre", "json", pretty(detail)));
}

async function submitBroadcast(event) {
  event.preventDefault();
  try {
    const body = {
      channel: $("broadcast-channel").value.trim(),
      op: $("broadcast-op").value.trim(),
      data: parseData($("broadcast-data").value),
      key: $("broadcast-key").value.trim(),
    };
    const { body: answer } = await call("/api/broadcast", body);
    resultBox("broadcast-result", "ok", (answer.duplicate ? "Already sent (same key): " : "Stored: ") + answer.channel + " #" + answer.cursor, answer);
  } catch (e) {
    resultBox("broadcast-result", "fail", e.code + ": " + e.message);
  }
}

async function submitSend(event) {
  event.preventDefault();
  try {
    const body = {
      target: $("send-target").value.trim(),
      op: $("send-op").value.trim(),
      data: parseData($("send-data").value),
      timeout_ms: number("send-timeout"),
    };
    const { body: answer } = await call("/api/send", body);
    const reply = answer.reply || {};
    resultBox("send-result", reply.error ? "fail" : "ok", (reply.error ? "Replied with error: " + reply.error : "Reply " + reply.op + " from " + reply.sender), reply.data);
  } catch (e) {
    resultBox("send-result", "fail", e.code + ": " + e.message);
  }
}

// --- Gather and Rollout ----------------------------------------------------------

async function loadCapabilities() {
  try {
    const { body } = await call("/api/capabilities");
    state.capabilities = body;
  } catch (_) {
    state.capabilities = null;
  }
  renderCapabilities();
}

function renderCapabilities() {
  const caps = state.capabilities || {};
  const missing = ["gather", "rollout"].filter((name) => caps[name] === false);
  const notice = $("ops-unavailable");
  notice.hidden = missing.length === 0;
  notice.textContent = missing.length
    ? "Not available on this server: " + missing.map((n) => n[0].toUpperCase() + n.slice(1)).join(" and ") + " (the server answers UNIMPLEMENTED)."
    : "";
  for (const name of ["gather", "rollout"]) {
    const off = caps[name] === false;
    $(name + "-form").classList.toggle("unavailable", off);
    $(name + "-preview").disabled = off || $(name + "-preview").dataset.denied === "1";
    if (off) $(name + "-submit").disabled = true;
  }
}

// --- locks and limits ------------------------------------------------------------

function table(className, names, rows) {
  const node = el("table", className);
  const head = el("tr");
  for (const name of names) head.append(el("th", null, name));
  node.append(head);
  for (const row of rows) node.append(row);
  return node;
}

function row(className, cells) {
  const tr = el("tr", className);
  for (const [text, cellClass] of cells) tr.append(el("td", cellClass, text));
  return tr;
}

function inSeconds(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  return s < 120 ? s + " s" : Math.round(s / 60) + " min";
}

async function loadLocks() {
  const caps = state.capabilities || {};
  const unavailable = caps.lock === false && caps.limit === false;
  $("locks-status").hidden = !unavailable;
  $("locks-status").textContent = unavailable ? "Not available on this server: Lock and Limit answer UNIMPLEMENTED." : "";
  const grants = state.session && state.session.grants;
  $("locks-scope").textContent = !grants
    ? "Unauthenticated server: every lock and bucket of the fleet is shown."
    : "Shown: the locks your token may take (" + ((grants.lock || []).join(", ") || "none") + ") and the buckets it may draw from (" + ((grants.limit || []).join(", ") || "none") + ").";
  try {
    const { body } = await call("/api/locks");
    showError($("locks-error"), null);
    renderLocks(body);
  } catch (e) {
    showError($("locks-error"), e);
  }
}

function renderLocks(body) {
  const summary = $("locks-summary");
  clear(summary);
  summary.append(stat(body.locks.length, "locks held", body.locks.length ? "warn" : null), stat(body.limits.length, "limits in use"));
  if (body.truncated) summary.append(el("span", "error", "The list was cut at the node's bound."));
  const now = Date.now();
  const locks = $("locks-list");
  clear(locks);
  if (body.locks.length === 0) {
    locks.append(el("p", "muted", "No lock is held."));
  } else {
    const rows = body.locks.map((l) => {
      const tr = row("lock", [[l.name, "id"], [l.holder], [l.fence, "id"], ["in " + inSeconds(l.expires_ms - now)]]);
      tr.dataset.name = l.name;
      tr.lastChild.title = new Date(l.expires_ms).toISOString();
      return tr;
    });
    locks.append(table("ledger", ["name", "holder", "fence", "expires"], rows));
  }
  const limits = $("limits-list");
  clear(limits);
  if (body.limits.length === 0) {
    limits.append(el("p", "muted", "Every bucket is full (none is in use)."));
  } else {
    const rows = body.limits.map((b) => {
      const tr = row("limit", [[b.name, "id"], [b.tokens + " / " + b.burst, "tokens"], [b.rate + " per " + inSeconds(b.interval_ms)], ["in " + inSeconds(b.full_in_ms)]]);
      tr.dataset.name = b.name;
      const meter = el("meter");
      meter.max = b.burst;
      meter.value = b.tokens;
      tr.children[1].append(meter);
      return tr;
    });
    limits.append(table("ledger", ["name", "tokens left", "refill", "full again"], rows));
  }
}

function opRequest(prefix) {
  const body = {
    target: $(prefix + "-target").value.trim(),
    op: $(prefix + "-op").value.trim(),
    data: parseData($(prefix + "-data").value),
    labels: parseLabels($(prefix + "-labels").value),
    timeout_ms: number(prefix + "-timeout"),
  };
  if (prefix === "rollout") {
    body.wave_size = number("rollout-wave");
    body.max_failures = parseInt($("rollout-failures").value, 10) || 0;
    body.ready_timeout_ms = number("rollout-ready");
    if (!$("rollout-key").value.trim()) $("rollout-key").value = "console-" + Date.now().toString(36);
    body.key = $("rollout-key").value.trim();
  }
  return body;
}

function ledgerTable(ledger) {
  const rows = (ledger.outcomes || []).map((o) => {
    const tr = row("status-" + o.status.toLowerCase(), [
      [o.member],
      [o.node],
      [o.wave || ""],
      [o.status, "status"],
      [o.duration_ms || ""],
      [o.detail || (o.reply && o.reply.error) || ""],
    ]);
    tr.dataset.member = o.member;
    return tr;
  });
  return table("ledger", ["member", "node", "wave", "status", "ms", "detail"], rows);
}

async function previewGather() {
  const box = $("gather-result");
  try {
    const { body: ledger } = await call("/api/gather", { ...opRequest("gather"), dry_run: true });
    clear(box);
    box.className = "result preview";
    box.append(el("p", null, "Preview: " + ledger.expected + " responder(s) of " + ledger.target + " would be asked."));
    box.append(ledgerTable(ledger));
    $("gather-submit").disabled = ledger.expected === 0;
  } catch (e) {
    resultBox("gather-result", "fail", e.code + ": " + e.message);
  }
}

async function submitGather(event) {
  event.preventDefault();
  $("gather-submit").disabled = true;
  try {
    const { body: ledger } = await call("/api/gather", opRequest("gather"));
    const box = $("gather-result");
    clear(box);
    box.className = "result " + (ledger.ok === ledger.expected ? "ok" : "fail");
    box.append(el("p", null, ledger.state + ": " + ledger.ok + " OK, " + ledger.failed + " failed, " + ledger.no_reply + " no reply of " + ledger.expected));
    box.append(ledgerTable(ledger));
  } catch (e) {
    resultBox("gather-result", "fail", e.code + ": " + e.message);
  }
}

// Reads a Rollout's event stream (one JSON object per line) as it arrives.
async function streamRollout(body, onEvent) {
  const response = await fetch("/api/rollout", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.session.csrf },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    let error = null;
    try {
      error = await response.json();
    } catch (_) {
      error = null;
    }
    throw new ApiError(response.status, error);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (line.trim()) onEvent(JSON.parse(line));
    }
  }
}

async function previewRollout() {
  const box = $("rollout-result");
  try {
    let plan = null;
    await streamRollout({ ...opRequest("rollout"), dry_run: true }, (item) => {
      if (item.error) throw new ApiError(0, item.error);
      if (item.event && item.event.ledger) plan = item.event.ledger;
    });
    if (!plan) throw new ApiError(0, { code: "UNKNOWN", message: "the dry run returned no plan" });
    state.rolloutPlan = plan;
    clear(box);
    box.className = "result preview";
    const skipped = plan.outcomes.filter((o) => o.status === "SKIPPED").length;
    box.append(el("p", null, "Preview: " + plan.expected + " member(s) of " + plan.target + " in " + plan.waves + " wave(s)" + (skipped ? ", " + skipped + " already OK under this key (skipped)." : ".")));
    box.append(ledgerTable(plan));
    $("rollout-submit").disabled = plan.expected === 0;
  } catch (e) {
    resultBox("rollout-result", "fail", e.code + ": " + e.message);
  }
}

function rolloutCell(outcome) {
  const grid = $("rollout-grid");
  let cell = state.rollout.cells.get(outcome.member);
  if (!cell) {
    cell = el("div", "cell");
    cell.dataset.member = outcome.member;
    cell.append(el("span", "id", outcome.member), el("span", "muted where"), el("span", "status", ""));
    state.rollout.cells.set(outcome.member, cell);
    grid.append(cell);
  }
  state.rollout.outcomes.set(outcome.member, outcome);
  cell.className = "cell status-" + outcome.status.toLowerCase();
  cell.dataset.status = outcome.status;
  cell.children[1].textContent = (outcome.wave ? "wave " + outcome.wave + " · " : "") + (outcome.node || "");
  cell.lastChild.textContent = outcome.status;
  cell.title = (outcome.node ? "node " + outcome.node + ". " : "") + (outcome.detail || "");
}

// While the rollout runs, the members of the wave being asked: the first wave
// with members still PENDING (a wave starts once the one before has answered).
function markAsking() {
  let wave = 0;
  for (const o of state.rollout.outcomes.values()) {
    if (o.status === "PENDING" && o.wave && (!wave || o.wave < wave)) wave = o.wave;
  }
  for (const [member, cell] of state.rollout.cells) {
    const o = state.rollout.outcomes.get(member);
    const asking = state.rollout.running && wave > 0 && o.status === "PENDING" && o.wave === wave;
    cell.classList.toggle("asking", asking);
    cell.dataset.asking = asking ? "1" : "";
    if (asking) cell.lastChild.textContent = "ASKING";
    else if (o.status === "PENDING") cell.lastChild.textContent = "PENDING";
  }
}

function rolloutCounts(ledger) {
  const counts = $("rollout-counts");
  clear(counts);
  counts.append(
    stat(ledger.expected, "members"),
    stat(ledger.ok, "OK", "ok"),
    stat(ledger.failed, "failed", "fail"),
    stat(ledger.no_reply, "no reply", "fail"),
    stat(ledger.not_ready, "not ready", "warn"),
    stat(ledger.skipped, "skipped"),
  );
}

async function runRollout(event) {
  if (event) event.preventDefault();
  const body = opRequest("rollout");
  state.rollout = { key: body.key, cells: new Map(), outcomes: new Map(), running: true };
  $("rollout-submit").disabled = true;
  $("rollout-run").hidden = false;
  $("rollout-resume").hidden = true;
  $("rollout-run-key").textContent = "key " + body.key;
  $("rollout-run-state").textContent = "RUNNING";
  $("rollout-run-state").className = "badge running";
  clear($("rollout-grid"));
  clear($("rollout-ledger"));
  clear($("rollout-counts"));
  $("rollout-run").scrollIntoView({ block: "start" });
  // Every member of the previewed plan from the start, grey until it answers.
  for (const o of (state.rolloutPlan && state.rolloutPlan.outcomes) || []) rolloutCell(o);
  markAsking();
  let final = null;
  try {
    await streamRollout(body, (item) => {
      if (item.error) throw new ApiError(0, item.error);
      const e = item.event;
      if (e.outcome) rolloutCell(e.outcome);
      if (e.ledger) {
        final = e.ledger;
        for (const o of e.ledger.outcomes) rolloutCell(o);
        rolloutCounts(e.ledger);
      }
      markAsking();
    });
  } catch (e) {
    resultBox("rollout-result", "fail", e.code + ": " + e.message);
  }
  state.rollout.running = false;
  markAsking();
  const stateBadge = $("rollout-run-state");
  const complete = !!final && final.state === "DONE" && final.ok + final.skipped === final.expected;
  if (final) {
    stateBadge.textContent = final.state;
    stateBadge.className = "badge " + (complete ? "ok" : "fail");
    const ledger = $("rollout-ledger");
    ledger.append(el("h3", null, "Ledger " + final.id), ledgerTable(final));
  } else {
    stateBadge.textContent = "INTERRUPTED";
    stateBadge.className = "badge fail";
  }
  $("rollout-resume").hidden = complete;
}

// Resuming starts with the preview of the rerun: members already OK are skipped.
async function resumeRollout() {
  $("rollout-key").value = state.rollout.key;
  await previewRollout();
  $("rollout-form").scrollIntoView();
}

// The dot on the Health tab: green while this replica's bus is healthy.
async function refreshHealthDot() {
  try {
    const { body } = await call("/api/health");
    $("health-dot").className = "dot " + (body.bus_healthy ? "ok" : "fail");
  } catch (_) {
    $("health-dot").className = "dot fail";
  }
}

// --- health --------------------------------------------------------------------

async function loadHealth() {
  const cards = $("health-cards");
  try {
    const [{ body: health }, members] = await Promise.all([
      call("/api/health"),
      call("/api/members").then((r) => r.body.members, () => null),
    ]);
    showError($("health-error"), null);
    clear(cards);
    cards.append(healthCard("This replica", health.node, [["version", health.version], ["subscribers here", health.subscribers]], true));
    cards.append(healthCard("Bus", health.bus, [["as seen by " + health.node, health.bus_healthy ? "healthy" : "unreachable"]], health.bus_healthy));
    $("health-dot").className = "dot " + (health.bus_healthy ? "ok" : "fail");
    renderReplicas(health, members);
  } catch (e) {
    showError($("health-error"), e);
  }
}

function healthCard(title, name, rows, ok) {
  const card = el("div", "card health " + (ok ? "ok" : "fail"));
  card.append(el("h3", null, title), el("p", "big", name));
  const list = el("dl", "fields");
  for (const [k, v] of rows) list.append(el("dt", null, k), el("dd", null, v));
  card.append(list);
  return card;
}

// Replicas fleet-wide: those whose presence the bus shows (Redis), and every other
// node members are connected to (sidecars relaying their pod's processes).
function renderReplicas(health, members) {
  const list = $("health-replicas");
  clear(list);
  const nodes = new Map();
  for (const r of health.replicas || []) nodes.set(r.name, { replica: r, members: 0 });
  if (!nodes.has(health.node)) nodes.set(health.node, { replica: { name: health.node }, members: 0 });
  for (const m of members || []) {
    if (!nodes.has(m.node)) nodes.set(m.node, { replica: null, members: 0 });
    nodes.get(m.node).members += 1;
  }
  for (const name of [...nodes.keys()].sort()) {
    const { replica, members: count } = nodes.get(name);
    const row = el("div", "replica");
    row.dataset.node = name;
    row.dataset.kind = replica ? "replica" : "relay";
    const ok = name === health.node ? health.bus_healthy : true;
    row.append(el("span", "dot " + (ok ? "ok" : "fail")), el("b", null, name));
    row.append(chip(replica ? "replica" : "sidecar or relay", replica ? "role" : "watch"));
    if (name === health.node) row.append(chip("serving this page"));
    const published = replica && replica.members !== undefined ? replica.members : count;
    row.append(el("span", "muted", published + " member(s)"));
    if (replica && replica.heartbeat_age_ms !== undefined) {
      row.append(el("span", "muted", "heartbeat " + (replica.heartbeat_age_ms / 1000).toFixed(1) + " s ago"));
    }
    list.append(row);
  }
  if (health.replicas_error) list.append(el("p", "error", "Replicas unknown: " + health.replicas_error));
  if (members === null) list.append(el("p", "muted", "Your token may not list members: sidecars are not shown."));
}

// --- start ---------------------------------------------------------------------

function wire() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("members-filter").addEventListener("input", renderMembers);
  $("members-refresh").addEventListener("click", loadMembers);
  $("tail-form").addEventListener("submit", startTail);
  $("tail-stop").addEventListener("click", stopTail);
  $("tail-pause").addEventListener("click", togglePause);
  $("tail-filter").addEventListener("input", filterTail);
  $("tail-clear").addEventListener("click", () => {
    clear($("tail-list"));
    $("tail-detail").hidden = true;
    $("count-tail").textContent = "";
  });
  $("broadcast-form").addEventListener("submit", submitBroadcast);
  $("send-form").addEventListener("submit", submitSend);
  $("gather-preview").addEventListener("click", previewGather);
  $("gather-form").addEventListener("submit", submitGather);
  $("rollout-preview").addEventListener("click", previewRollout);
  $("rollout-form").addEventListener("submit", runRollout);
  $("rollout-resume").addEventListener("click", resumeRollout);
  for (const prefix of ["gather", "rollout"]) {
    // A changed form (the key too: it decides who is skipped) needs a new preview.
    $(prefix + "-form").addEventListener("input", () => {
      $(prefix + "-submit").disabled = true;
    });
  }
  $("locks-refresh").addEventListener("click", loadLocks);
  $("health-refresh").addEventListener("click", loadHealth);
  // Members and health stay current while shown.
  setInterval(() => {
    if (!state.session || document.hidden) return;
    if (!$("view-members").hidden) loadMembers();
    if (!$("view-locks").hidden) loadLocks();
    if (!$("view-health").hidden) loadHealth();
    else refreshHealthDot();
  }, 5000);
}

async function start() {
  wire();
  try {
    const { body } = await call("/api/session");
    if (body.logged_in) {
      showApp(body);
    } else {
      $("login-hint").textContent = body.requires_token
        ? "Log in with a token of the server's tokens file."
        : "This server has no tokens file: leave the token empty.";
      showLogin();
    }
  } catch (e) {
    showLogin(e.message);
  }
}

document.addEventListener("DOMContentLoaded", start);
