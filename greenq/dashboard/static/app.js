// greenq dashboard: polls the JSON API every second and redraws; no library,
// nothing fetched from elsewhere.
"use strict";

const REFRESH_MS = 1000;
const $ = (sel) => document.querySelector(sel);

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
  const resp = await fetch(path, options);
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

const fmt = {
  time: (t) => t ? new Date(t * 1000).toLocaleTimeString() : "",
  secs: (s) => s == null ? "" : s < 0.001 ? `${Math.round(s * 1e6)} µs`
    : s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`,
  mib: (b) => b ? `${(b / 1048576).toFixed(1)} MiB` : "",
};

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderWorkers(workers) {
  fill($("#workers tbody"), workers.map((w) => el("tr", {"data-worker": w.name},
    el("td", {class: "name"}, w.name),
    el("td", {class: w.online ? "online" : "offline"}, w.online ? "online" : "offline"),
    el("td", {}, w.pool), el("td", {class: "concurrency"}, w.concurrency),
    el("td", {class: "running"}, w.running), el("td", {}, w.held),
    el("td", {class: "processed"}, w.processed), el("td", {}, w.failed),
    el("td", {}, fmt.mib(w.rss)), el("td", {}, `${w.seconds_since_heartbeat} s ago`),
    el("td", {}, (w.queues || []).join(", ")))));
  $("#workers-empty").hidden = workers.length > 0;
  $("#workers-count").textContent = `${workers.filter((w) => w.online).length} online`;
}

function renderQueues(queues) {
  fill($("#queues tbody"), queues.map((q) => el("tr", {"data-queue": q.name},
    el("td", {}, q.name), el("td", {class: "ready"}, q.ready), el("td", {class: "held"}, q.held),
    el("td", {class: "delayed"}, q.delayed), el("td", {class: "dead"}, q.dead))));
}

function when(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleString() : "-";
}

function renderSchedule(entries) {
  fill($("#schedule tbody"), entries.map((e) => el("tr", {"data-entry": e.name},
    el("td", {}, e.name), el("td", {}, e.task),
    el("td", {}, e.cron ? `${e.cron} (${e.timezone})` : `${e.every} s`),
    el("td", {}, when(e.last_run)), el("td", {class: "next"}, when(e.next_run)))));
}

function renderChart(points) {
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

function renderFailures(failures) {
  // the newest failure is open, and those the user opened
  $("#failures").replaceChildren(...failures.map((f, i) => el("details",
    {class: "failure", "data-task": f.id, open: i === 0 || userOpened.has(f.id)},
    el("summary", {onclick: () => userOpened.has(f.id) ? userOpened.delete(f.id) : userOpened.add(f.id)},
      el("strong", {}, f.name), " ", el("code", {}, f.id), " on ", f.worker || "?",
      " at ", fmt.time(f.updated), ": ", el("span", {class: "exception"}, f.exception || "")),
    el("pre", {class: "traceback"}, f.traceback || "(no traceback)"))));
  $("#failures-empty").hidden = failures.length > 0;
}

function renderTasks(tasks) {
  fill($("#tasks tbody"), tasks.map((t) => el("tr", {"data-task": t.id},
    el("td", {}, el("code", {}, t.id)), el("td", {}, t.name),
    el("td", {class: `state state-${t.state}`}, t.state), el("td", {class: "args"}, t.args || ""),
    el("td", {}, t.worker || ""), el("td", {}, fmt.secs(t.runtime)), el("td", {}, fmt.secs(t.queue_wait)),
    el("td", {}, fmt.time(t.updated)))));
}

function renderDlq(letters) {
  fill($("#dlq tbody"), letters.map((d) => el("tr", {"data-dead": d.id},
    el("td", {}, el("code", {}, d.id)), el("td", {}, d.queue), el("td", {}, d.task || "?"),
    el("td", {class: "reason"}, d.reason), el("td", {}, fmt.time(d.failed_at)),
    el("td", {}, el("button", {class: "requeue", type: "button", onclick: () => confirmThen(
      `Requeue dead letter ${d.id} (${d.task || "?"}) to ${d.queue}?`,
      () => api("/api/dlq/requeue", {ids: [d.id]}))}, "Requeue")))));
  $("#dlq-count").textContent = `${letters.length}`;
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

async function refresh() {
  try {
    const q = encodeURIComponent($("#task-search").value), state = encodeURIComponent($("#task-state").value);
    const [workers, queues, points, failures, tasks, dlq, schedule] = await Promise.all([
      api("/api/workers"), api("/api/queues"), api("/api/throughput"), api("/api/failures?limit=8"),
      api(`/api/tasks?q=${q}&state=${state}&limit=100`), api("/api/dlq"), api("/api/schedule")]);
    renderWorkers(workers); renderQueues(queues); renderChart(points); renderFailures(failures);
    renderTasks(tasks); renderDlq(dlq); renderSchedule(schedule);
    $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $("#status").textContent = `cannot reach the dashboard: ${err.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
