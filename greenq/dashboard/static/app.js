// greenq dashboard: polls the JSON API every second and redraws; no library,
// nothing fetched from elsewhere.  Each table is fetched and drawn on its own
// (one that fails says so in its section; the others still update), every
// value is checked for its type before it is shown (a wrong one shows blank),
// and a refresh never starts while the last one is still running.
"use strict";

const REFRESH_MS = 1000;
const FETCH_TIMEOUT_MS = 10000;
const $ = (sel) => document.querySelector(sel);

// what the API says is shown only when it has the expected type
const str = (v) => typeof v === "string" ? v : "";
const num = (v) => typeof v === "number" && Number.isFinite(v) ? v : null;
const show = (v) => typeof v === "string" ? v : (num(v) === null ? "" : String(v));
const objects = (v) => Array.isArray(v) ? v.filter((o) => o !== null && typeof o === "object" && !Array.isArray(o)) : [];
const strings = (v) => Array.isArray(v) ? v.filter((s) => typeof s === "string") : [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-GreenQ": "1"},
  };
  const resp = await fetch(path, {...options, signal: AbortSignal.timeout(FETCH_TIMEOUT_MS)});
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

const fmt = {
  time: (t) => num(t) ? new Date(t * 1000).toLocaleTimeString() : "",
  secs: (s) => num(s) === null ? "" : s < 0.001 ? `${Math.round(s * 1e6)} µs`
    : s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`,
  mib: (b) => num(b) ? `${(b / 1048576).toFixed(1)} MiB` : "",
  age: (s) => num(s) === null ? "" : `${s.toFixed(1)} s`,
};

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderWorkers(data) {
  const workers = objects(data);
  fill($("#workers tbody"), workers.map((w) => el("tr", {"data-worker": str(w.name)},
    el("td", {class: "name"}, str(w.name)),
    el("td", {class: w.online === true ? "online" : "offline"}, w.online === true ? "online" : "offline"),
    el("td", {}, show(w.pool)), el("td", {class: "concurrency"}, show(w.concurrency)),
    el("td", {class: "running"}, show(w.running)), el("td", {}, show(w.held)),
    el("td", {class: "processed"}, show(w.processed)), el("td", {}, show(w.failed)),
    el("td", {}, fmt.mib(w.rss)),
    el("td", {}, num(w.seconds_since_heartbeat) === null ? "" : `${w.seconds_since_heartbeat} s ago`),
    el("td", {class: "queues"}, strings(w.queues).join(", ")))));
  $("#workers-empty").hidden = workers.length > 0;
  $("#workers-count").textContent = `${workers.filter((w) => w.online === true).length} online`;
}

function renderQueues(data) {
  fill($("#queues tbody"), objects(data).map((q) => el("tr", {"data-queue": str(q.name)},
    el("td", {}, str(q.name)), el("td", {class: "ready"}, show(q.ready)), el("td", {class: "held"}, show(q.held)),
    el("td", {class: "delayed"}, show(q.delayed)), el("td", {class: "dead"}, show(q.dead)),
    // the oldest ready message's wait; blank where the broker cannot tell (RabbitMQ)
    el("td", {class: "oldest-ready-age"}, fmt.age(q.oldest_ready_age)))));
}

// a small chart of the limit in force (and the permits in use) over the points of one resource
function sparkline(points) {
  const ns = "http://www.w3.org/2000/svg", W = 160, H = 28, pad = 2;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "sparkline");
  svg.setAttribute("width", String(W));
  svg.setAttribute("height", String(H));
  const ps = points.map((p) => ({limit: num(p.limit) || 0, in_use: num(p.in_use) || 0}));
  const max = Math.max(1, ...ps.map((p) => Math.max(p.limit, p.in_use)));
  const step = (W - 2 * pad) / Math.max(1, ps.length - 1);
  const line = (key, color) => {
    const node = document.createElementNS(ns, "polyline");
    node.setAttribute("points", ps.map((p, i) =>
      `${(pad + i * step).toFixed(1)},${(H - pad - (p[key] / max) * (H - 2 * pad)).toFixed(1)}`).join(" "));
    node.setAttribute("fill", "none");
    node.setAttribute("stroke", color);
    node.setAttribute("stroke-width", "1.5");
    node.setAttribute("class", key);
    return node;
  };
  svg.replaceChildren(line("limit", "#34495e"), line("in_use", "#2e8b57"));
  return svg;
}

function renderResources(data) {
  const resources = objects(data);
  fill($("#resources tbody"), resources.map((r) => el("tr", {"data-resource": str(r.name)},
    el("td", {class: "name"}, str(r.name)), el("td", {}, str(r.scope)),
    el("td", {class: "limit"}, show(r.limit)), el("td", {class: "configured"}, show(r.configured_limit)),
    el("td", {class: "in-use"}, show(r.in_use)), el("td", {class: "waiting"}, show(r.waiting)),
    el("td", {}, show(r.workers)),
    el("td", {class: "history", title: objects(r.history).map((p) => show(p.limit)).join(" ")},
      sparkline(objects(r.history))))));
  $("#resources-empty").hidden = resources.length > 0;
}

function when(epoch) {
  return num(epoch) ? new Date(epoch * 1000).toLocaleString() : "-";
}

function renderSchedule(data) {
  fill($("#schedule tbody"), objects(data).map((e) => el("tr", {"data-entry": str(e.name)},
    el("td", {}, str(e.name)), el("td", {}, str(e.task)),
    el("td", {}, e.cron ? `${show(e.cron)} (${show(e.timezone)})` : `${show(e.every)} s`),
    el("td", {}, when(e.last_run)), el("td", {class: "next"}, when(e.next_run)))));
}

function renderChart(data) {
  const points = objects(data).map((p) => ({succeeded: num(p.succeeded) || 0, failed: num(p.failed) || 0}));
  const svg = $("#chart");
  const W = 600, H = 160, pad = 4;
  const max = Math.max(1, ...points.map((p) => p.succeeded + p.failed));
  const step = (W - 2 * pad) / Math.max(1, points.length - 1);
  const y = (v) => H - pad - (v / max) * (H - 2 * pad);
  const line = (key) => points.map((p, i) => `${(pad + i * step).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
  const ns = "http://www.w3.org/2000/svg";
  const poly = (cls, key, color) => {
    const node = document.createElementNS(ns, "polyline");
    node.setAttribute("points", line(key));
    node.setAttribute("fill", "none");
    node.setAttribute("stroke", color);
    node.setAttribute("stroke-width", "2");
    node.setAttribute("class", cls);
    return node;
  };
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "8"); label.setAttribute("y", "14"); label.setAttribute("font-size", "11");
  label.textContent = `max ${max}`;
  svg.replaceChildren(poly("succeeded", "succeeded", "#2e8b57"), poly("failed", "failed", "#c0392b"), label);
  const total = points.reduce((a, p) => a + p.succeeded, 0), failed = points.reduce((a, p) => a + p.failed, 0);
  $("#chart-total").textContent = `(${total} succeeded, ${failed} failed in 10 min)`;
}

const userOpened = new Set();

function renderFailures(data) {
  // the newest failure is open, and those the user opened
  const failures = objects(data);
  $("#failures").replaceChildren(...failures.map((f, i) => {
    const id = str(f.id);
    return el("details", {class: "failure", "data-task": id, open: i === 0 || userOpened.has(id)},
      el("summary", {onclick: () => userOpened.has(id) ? userOpened.delete(id) : userOpened.add(id)},
        el("strong", {}, str(f.name)), " ", el("code", {}, id), " on ", str(f.worker) || "?",
        " at ", fmt.time(f.updated), ": ", el("span", {class: "exception"}, str(f.exception))),
      el("pre", {class: "traceback"}, str(f.traceback) || "(no traceback)"));
  }));
  $("#failures-empty").hidden = failures.length > 0;
}

function renderTasks(data) {
  fill($("#tasks tbody"), objects(data).map((t) => el("tr", {"data-task": str(t.id)},
    el("td", {}, el("code", {}, str(t.id))), el("td", {}, str(t.name)),
    el("td", {class: `state state-${str(t.state)}`}, str(t.state)), el("td", {class: "args"}, str(t.args)),
    el("td", {}, str(t.worker)), el("td", {}, fmt.secs(t.runtime)), el("td", {}, fmt.secs(t.queue_wait)),
    el("td", {}, fmt.time(t.updated)))));
}

function renderDlq(data) {
  const letters = objects(data);
  fill($("#dlq tbody"), letters.map((d) => {
    const id = str(d.id), task = str(d.task) || "?";
    return el("tr", {"data-dead": id},
      el("td", {}, el("code", {}, id)), el("td", {}, str(d.queue)), el("td", {}, task),
      el("td", {class: "reason"}, str(d.reason)), el("td", {}, fmt.time(d.failed_at)),
      el("td", {}, el("button", {class: "requeue", type: "button", onclick: () => confirmThen(
        `Requeue dead letter ${id} (${task}) to ${str(d.queue)}?`,
        () => api("/api/dlq/requeue", {ids: [id]}))}, "Requeue")));
  }));
  $("#dlq-count").textContent = `${letters.length}`;
}

function renderStats(data) {
  const skipped = (num(data && data.events_skipped) || 0) + (num(data && data.fields_dropped) || 0);
  $("#events-malformed").textContent = skipped ? `${skipped} malformed event(s) or field(s) ignored` : "";
}

function confirmThen(text, action) {
  $("#confirm-text").textContent = text;
  $("#confirm").hidden = false;
  $("#confirm-yes").onclick = async () => {
    $("#confirm").hidden = true;
    try { await action(); } catch (err) { $("#status").textContent = `failed: ${err.message}`; }
    refresh();
  };
  $("#confirm-no").onclick = () => { $("#confirm").hidden = true; };
}

$("#dlq-requeue-all").onclick = () => confirmThen("Requeue every dead letter to its queue?",
  () => api("/api/dlq/requeue", {all: true}));
$("#dlq-purge").onclick = () => confirmThen("Delete every dead letter for good?", () => api("/api/dlq/purge", {}));
$("#task-search").oninput = () => refresh();
$("#task-state").onchange = () => refresh();

// section id -> [the API path, how to draw it]
const TABLES = {
  "workers-section": [() => "/api/workers", renderWorkers],
  "queues-section": [() => "/api/queues", renderQueues],
  "throughput-section": [() => "/api/throughput", renderChart],
  "failures-section": [() => "/api/failures?limit=8", renderFailures],
  "tasks-section": [() => `/api/tasks?q=${encodeURIComponent($("#task-search").value)}`
    + `&state=${encodeURIComponent($("#task-state").value)}&limit=100`, renderTasks],
  "dlq-section": [() => "/api/dlq", renderDlq],
  "schedule-section": [() => "/api/schedule", renderSchedule],
  "resources-section": [() => "/api/resources", renderResources],
  "events-malformed": [() => "/api/stats", renderStats],
};

// one table: fetched and drawn alone; its section says when that failed
async function refreshOne(id, path, render) {
  const section = document.getElementById(id);
  try {
    render(await api(path()));
    delete section.dataset.error;
    return null;
  } catch (err) {
    section.dataset.error = err.message;
    return id.replace("-section", "");
  }
}

let inFlight = false;

async function refresh() {
  if (inFlight) return;                     // the last one is still running: never two at once
  inFlight = true;
  try {
    const failed = (await Promise.all(Object.entries(TABLES).map(
      ([id, [path, render]]) => refreshOne(id, path, render)))).filter((name) => name);
    $("#status").textContent = failed.length === Object.keys(TABLES).length
      ? "cannot reach the dashboard"
      : `updated ${new Date().toLocaleTimeString()}${failed.length ? `; not updated: ${failed.join(", ")}` : ""}`;
  } finally {
    inFlight = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
