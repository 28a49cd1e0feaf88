"use strict";
// Polls /api/stats, keeps a short history in memory, and renders numbers and charts.
// Rates and windowed percentiles come from the difference between two polls.
const POLL_MS = 1000;
const KEEP = 300; // samples of history (5 min at 1 s)
const history = [];

const get = (obj, path) => path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);

const fmt = {
  count: (v) => Math.round(v).toLocaleString("en-US"),
  bytes: (v) => {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  },
  percent: (v) => (v * 100).toFixed(1) + " %",
  gb_per_s: (v) => v.toFixed(2) + " GB/s",
  rate: (v) => (v >= 1e9 ? (v / 1e9).toFixed(2) + " GB/s" : v >= 1e6 ? (v / 1e6).toFixed(1) + " MB/s" : (v / 1e3).toFixed(1) + " kB/s"),
  seconds: (v) => (v >= 1 ? v.toFixed(2) + " s" : v >= 1e-3 ? (v * 1e3).toFixed(2) + " ms" : (v * 1e6).toFixed(0) + " \u00b5s"),
  duration: (v) => {
    const d = Math.floor(v / 86400), h = Math.floor(v / 3600) % 24, m = Math.floor(v / 60) % 60, s = Math.floor(v % 60);
    return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + s + "s";
  },
  text: (v) => String(v),
};

// PromQL histogram_quantile over cumulative [bound, count] buckets (the node's own rule).
function quantile(q, buckets, count) {
  if (!count) return null;
  const rank = q * count;
  let lower = 0, below = 0;
  for (const [upper, cum] of buckets) {
    if (cum >= rank) return cum === below ? upper : lower + ((upper - lower) * (rank - below)) / (cum - below);
    lower = upper; below = cum;
  }
  return lower;
}

function derive(s) {
  const lookups = s.totals.lookup_blocks;
  const errors = Object.values(s.errors || {}).reduce((a, b) => a + b, 0);
  s.derived = { hit_ratio: lookups ? s.totals.hit_blocks / lookups : 0, errors };
  return s;
}

function fill(s) {
  for (const el of document.querySelectorAll("[data-k]")) {
    const v = get(s, el.dataset.k);
    if (v === undefined || v === null) { el.textContent = "-"; el.dataset.v = ""; continue; }
    el.dataset.v = String(v);
    el.textContent = (fmt[el.dataset.f] || fmt.text)(v);
  }
}

// Difference of two samples: rates per second and the window's own latency percentiles.
function delta(a, b) {
  const dt = (b.t - a.t) / 1000;
  if (dt <= 0) return null;
  const tb = b.s.totals, ta = a.s.totals;
  const looked = tb.lookup_blocks - ta.lookup_blocks;
  const p99 = {};
  for (const op of ["lookup", "save", "load"]) {
    const rb = b.s.requests[op], ra = a.s.requests[op];
    if (!rb || !ra) { p99[op] = null; continue; }
    const buckets = rb.buckets.map(([le, c], i) => [le, c - (ra.buckets[i] ? ra.buckets[i][1] : 0)]);
    p99[op] = quantile(0.99, buckets, rb.count - ra.count);
  }
  return {
    t: b.t,
    hit: looked > 0 ? (tb.hit_blocks - ta.hit_blocks) / looked : null,
    lookupRate: looked / dt,
    save: (tb.save_bytes - ta.save_bytes) / dt,
    load: (tb.load_bytes - ta.load_bytes) / dt,
    p99,
  };
}

function sampleAgo(ms) {
  const last = history[history.length - 1];
  for (let i = history.length - 1; i >= 0; i--) if (last.t - history[i].t >= ms) return history[i];
  return history[0];
}

function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

// A line chart on a canvas: series [{color, points: [[t, v|null]]}], y from 0 to max.
function chart(id, series, yFmt, yMax) {
  const canvas = document.getElementById(id);
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight || 170;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const left = 58, right = 8, top = 8, bottom = 20;
  const now = history.length ? history[history.length - 1].t : Date.now();
  // The last 2 minutes, or less while the page has less history.
  const first = history.length ? history[0].t : now;
  const span = Math.min(120000, Math.max(10000, now - first));
  let max = yMax || 0;
  if (!yMax) for (const s of series) for (const [, v] of s.points) if (v != null && v > max) max = v;
  if (!max) max = 1;
  max *= yMax ? 1 : 1.15;
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = css("--muted");
  g.strokeStyle = css("--border");
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + ((h - top - bottom) * i) / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - right, y); g.stroke();
    g.fillText(yFmt(max * (1 - i / 4)), 4, y + 4);
  }
  for (let i = 4; i >= 0; i--) {
    const sec = Math.round((span / 1000) * (i / 4));
    const x = left + ((w - left - right) * (span - sec * 1000)) / span;
    g.fillText(sec ? "-" + sec + "s" : "now", Math.min(x - 10, w - right - 24), h - 5);
  }
  for (const s of series) {
    g.strokeStyle = s.color; g.lineWidth = 2; g.beginPath();
    let pen = false;
    for (const [t, v] of s.points) {
      if (now - t > span) continue;
      if (v == null) { pen = false; continue; }
      const x = left + ((w - left - right) * (span - (now - t))) / span;
      const y = top + (h - top - bottom) * (1 - Math.min(v, max) / max);
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true;
      g.fillStyle = s.color;
      g.fillRect(x - 1.5, y - 1.5, 3, 3); // isolated samples stay visible
    }
    g.stroke();
  }
  if (series.every((s) => s.points.every(([, v]) => v == null))) {
    g.fillStyle = css("--muted"); g.font = "12px system-ui, sans-serif";
    g.fillText("no activity yet", left + 10, top + 18);
  }
}

function rows(id, html) { document.getElementById(id).innerHTML = html; }

function cell(v, f) { return `<td data-v="${v}">${fmt[f](v)}</td>`; }

/** Text from the node (GPU names, configured UUIDs) as HTML. */
function text(v) {
  return String(v ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

/** The NUMA nodes and GPUs the node serves. */
function renderTopology(t) {
  if (!t) return;
  document.getElementById("numa-nodes").textContent = `NUMA nodes ${t.numa_nodes.join(", ")}`;
  rows("gpu-rows", t.gpus.map((g) => `<tr data-gpu="${text(g.uuid)}"><td>${text(g.uuid)}</td><td>${g.kind}</td>` +
    `<td>${g.numa_node}</td><td>${text([g.name, g.pci_bus_id].filter(Boolean).join(" "))}</td></tr>`).join("") ||
    `<tr><td colspan="4" class="muted">no GPU${t.driver_error ? ": " + text(t.driver_error) : ""}</td></tr>`);
}

function render() {
  const s = history[history.length - 1].s;
  fill(s);
  const pool = s.pool;
  const pct = (a, b) => (b ? Math.min(100, (100 * a) / b) : 0) + "%";
  document.getElementById("bar-pool-used").style.width = pct(pool.used_bytes, pool.capacity_bytes);
  document.getElementById("bar-pool-leased").style.width = pct(pool.leased_bytes, pool.capacity_bytes);
  const ssd = s.ssd;
  document.getElementById("ssd-off").style.display = ssd ? "none" : "";
  document.getElementById("ssd-on").style.display = ssd ? "" : "none";
  document.getElementById("ssd-foot").style.display = ssd ? "" : "none";
  document.getElementById("bar-ssd").style.width = ssd ? pct(ssd.used_bytes, ssd.capacity_bytes) : "0%";
  if (ssd) {
    const health = document.getElementById("ssd-health");
    health.textContent = ssd.healthy ? "healthy" : "writes stopped";
    health.className = ssd.healthy ? "ok" : "bad";
  }
  renderFabric(s.fabric);
  const codes = Object.entries(s.errors || {}).map(([c, n]) => `${c} ${fmt.count(n)}`);
  document.getElementById("error-codes").textContent = codes.length ? codes.join(", ") : "none";

  rows("latency-rows", Object.entries(s.requests).filter(([, l]) => l.count > 0)
    .map(([op, l]) => `<tr data-op="${op}"><td>${op}</td>${cell(l.count, "count")}${cell(l.p50_seconds, "seconds")}` +
      `${cell(l.p90_seconds, "seconds")}${cell(l.p99_seconds, "seconds")}</tr>`).join("") ||
    `<tr><td colspan="5" class="muted">no requests yet</td></tr>`);
  renderTopology(s.topology);
  rows("numa-pool-rows", (s.pools || []).map((p) => `<tr data-numa-node="${p.numa_node}"><td>${p.numa_node}</td>` +
    `${cell(p.used_bytes, "bytes")}${cell(p.capacity_bytes, "bytes")}${cell(p.pages, "count")}${cell(p.evictions, "count")}</tr>`).join(""));
  rows("device-rows", s.transfers.flatMap((d) => ["save", "load"].map((dir) => {
    const x = d[dir];
    return `<tr data-device="${d.device}" data-dir="${dir}"><td>${d.device}</td><td>${dir}</td>${cell(x.bytes, "bytes")}` +
      `${cell(x.gb_per_s, "gb_per_s").replace(" GB/s", "")}${cell(x.latency.count, "count")}` +
      `${cell(x.latency.p50_seconds, "seconds")}${cell(x.latency.p99_seconds, "seconds")}</tr>`;
  })).join(""));

  const deltas = [];
  for (let i = 1; i < history.length; i++) { const d = delta(history[i - 1], history[i]); if (d) deltas.push(d); }
  const last = deltas[deltas.length - 1];
  const windowed = history.length > 1 ? delta(sampleAgo(30000), history[history.length - 1]) : null;
  document.getElementById("hit-window").textContent = windowed && windowed.hit != null ? fmt.percent(windowed.hit) : "-";
  document.getElementById("lookup-rate").textContent = last ? fmt.count(last.lookupRate) : "-";
  document.getElementById("save-rate").textContent = last ? fmt.rate(last.save) : "-";
  document.getElementById("load-rate").textContent = last ? fmt.rate(last.load) : "-";
  chart("chart-hit", [{ color: css("--hit"), points: deltas.map((d) => [d.t, d.hit]) }], (v) => (v * 100).toFixed(0) + " %", 1);
  chart("chart-bw", [
    { color: css("--save"), points: deltas.map((d) => [d.t, d.save]) },
    { color: css("--load"), points: deltas.map((d) => [d.t, d.load]) },
  ], fmt.rate);
  chart("chart-lat", ["lookup", "save", "load"].map((op) => ({
    color: css("--" + op), points: deltas.map((d) => [d.t, d.p99[op]]),
  })), fmt.seconds);
}

function renderFabric(fabric) {
  const show = (id, on) => { document.getElementById(id).style.display = on ? "" : "none"; };
  show("fabric-off", !fabric); show("fabric-on", !!fabric); show("fabric-foot", !!fabric);
  show("fabric-table", !!fabric); show("fabric-empty", !fabric);
  if (!fabric) return;
  document.getElementById("fabric-peer-count").textContent = fmt.count(fabric.peers.length);
  document.getElementById("fabric-self").textContent = "this node: " + fabric.node_id;
  rows("peer-rows", fabric.peers.map((p) => `<tr data-peer="${p.node_id}"><td>${p.node_id}</td><td>${p.link_addr}</td>` +
    `<td>${p.zone || "-"}</td><td>${p.host}</td><td>${(p.load * 100).toFixed(0)} %</td>` +
    `<td>${p.rtt_ms == null ? "not measured" : p.rtt_ms.toFixed(2) + " ms"}</td>` +
    `<td>${p.digest_age_s == null ? "no stamp yet" : p.digest_age_s.toFixed(1) + " s"}</td>` +
    `<td>${fmt.bytes(p.bytes_received)}</td><td>${fmt.bytes(p.bytes_sent)}</td></tr>`).join("") ||
    `<tr><td colspan="9" class="muted">no live peers</td></tr>`);
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("api/stats", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    history.push({ t: Date.now(), s: derive(await response.json()) });
    if (history.length > KEEP) history.shift();
    render();
    status.textContent = "live"; status.className = "status live";
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (error) {
    status.textContent = "node unreachable"; status.className = "status stale";
  }
}

poll();
setInterval(poll, POLL_MS);
window.addEventListener("resize", () => history.length && render());
