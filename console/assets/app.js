// The vmreplay console page: plain JavaScript, no build step, no network
// access beyond the console's own API.
"use strict";

const $ = (id) => document.getElementById(id);
const NS = 1e6; // ns per ms

const S = {
  token: sessionStorage.getItem("vmr.token") || "",
  tenant: "",
  instances: [],
  instance: null,          // selected instance id
  tl: null,                // last timeline answer
  view: null,              // {from, to} in ns, null = whole recording
  selection: null,         // {from, to}
  snapshots: [],
  clone: null,             // the clone shown
  cloneWatch: null,        // AbortController of the watch stream
  cloneCrash: null,        // {t, seq} of the clone's crash
  replayerOk: null,
  lastRender: null,
  signedIn: false,
};
window.vmr = S;

// ---- API -----------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, opts = {}) {
  const headers = Object.assign({ "Authorization": "Bearer " + S.token }, opts.headers || {});
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, { method: opts.method || "GET", headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body), signal: opts.signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "console_unreachable", "the console server is unreachable");
  }
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const code = data && data.code || "http_" + r.status;
    const msg = data && data.error || ("HTTP " + r.status);
    if (r.status === 401 && code === "unauthenticated") signedOut(msg);
    throw new ApiError(r.status, code, msg);
  }
  return data;
}

// ---- banner and sign-in --------------------------------------------------

const problems = new Map(); // source -> message

function setProblem(source, msg) {
  if (msg) problems.set(source, msg); else problems.delete(source);
  const b = $("banner");
  if (problems.size === 0) { b.hidden = true; b.textContent = ""; return; }
  b.hidden = false;
  b.className = "";
  b.textContent = Array.from(problems.values()).join(" \u2014 ");
}

function signedOut(msg) {
  S.signedIn = false;
  $("signin").hidden = false;
  $("signin-error").textContent = msg || "";
  $("token").focus();
}

async function signIn(token) {
  S.token = token;
  try {
    const s = await api("/api/session");
    S.tenant = s.tenant;
    S.signedIn = true;
    sessionStorage.setItem("vmr.token", token);
    $("signin").hidden = true;
    $("signin-error").textContent = "";
    $("tenant").textContent = "tenant " + s.tenant;
    await Promise.all([refreshHealth(), refreshInstances(), refreshClones()]);
    route();
  } catch (e) {
    if (e.code !== "unauthenticated") { signedOut("cannot sign in: " + e.message); }
  }
}

// ---- health --------------------------------------------------------------

function dot(id, ok, title) {
  const d = $(id);
  d.classList.toggle("ok", ok === true);
  d.classList.toggle("bad", ok === false);
  d.title = title;
}

async function refreshHealth() {
  if (!S.signedIn) return;
  try {
    const h = await api("/api/health");
    setProblem("console", null);
    const k = h.kafka;
    const kafkaOk = !!k && k.last_error == null && k.topics_ready.length > 0;
    dot("h-kafka", kafkaOk, k ? (k.last_error || `${k.records} records read`) : "no consumer");
    setProblem("kafka", kafkaOk || !k ? null : "Kafka unreachable: " + (k.last_error || "no topic assigned yet"));
    dot("h-store", h.store.ok, h.store.error || "ok");
    dot("h-replayer", h.replayer.ok, h.replayer.error || "ok");
    const was = S.replayerOk;
    S.replayerOk = h.replayer.ok;
    setProblem("replayer", h.replayer.ok ? null : unreachable(h.replayer.error));
    if (was !== h.replayer.ok && S.clone) renderClone(true);
    if (h.replayer.ok && was === false) {
      // The replayer is back: pick up what it knows now.
      await refreshClones();
      if (S.clone) reloadClone(S.clone.clone_id);
    }
  } catch (e) {
    if (e.code === "console_unreachable") setProblem("console", "The console server is unreachable; retrying");
  }
}

function unreachable(msg) {
  return "Replayer unreachable: " + String(msg || "").replace(/^replayer unreachable: /i, "") +
    ". Replays and controls are unavailable until it answers again; the page checks every 2 s.";
}

// ---- instances -----------------------------------------------------------

async function refreshInstances() {
  if (!S.signedIn) return;
  try {
    const r = await api("/api/instances");
    S.instances = r.instances;
    const ul = $("instances");
    ul.textContent = "";
    for (const i of r.instances) {
      const li = document.createElement("li");
      li.dataset.id = i.id;
      li.className = i.id === S.instance ? "sel" : "";
      const name = document.createElement("span");
      name.textContent = i.id;
      const b = document.createElement("span");
      b.className = "badge" + (i.crashed_ns ? " crash" : "");
      b.textContent = i.crashed_ns ? "crashed" : fmtCount(i.events);
      li.append(name, b);
      li.onclick = () => { location.hash = "instance=" + encodeURIComponent(i.id); };
      ul.append(li);
    }
    const empty = $("instances-empty");
    empty.hidden = r.instances.length > 0;
    empty.textContent = `No recorded instances are visible to tenant ${r.tenant} yet.`;
  } catch (e) { /* shown by health */ }
}

function route() {
  const m = /instance=([^&]+)/.exec(location.hash);
  const id = m ? decodeURIComponent(m[1]) : null;
  if (id !== S.instance) {
    S.instance = id; S.tl = null; S.view = null; S.selection = null; S.cloneCrash = null;
    clearEvents();
    showClone(null);
  }
  for (const li of $("instances").children) li.classList.toggle("sel", li.dataset.id === id);
  $("welcome").hidden = !!id;
  if (!id) { $("view").hidden = true; $("instance-error").hidden = true; return; }
  loadTimeline();
}

// ---- timeline ------------------------------------------------------------

async function loadTimeline() {
  const id = S.instance;
  if (!id || !S.signedIn) return;
  const c = $("timeline");
  const points = Math.max(100, Math.floor(c.clientWidth || 1000));
  let q = `points=${points}`;
  if (S.view) q += `&from=${Math.floor(S.view.from)}&to=${Math.ceil(S.view.to)}`;
  const t0 = performance.now();
  try {
    const tl = await api(`/api/instances/${encodeURIComponent(id)}/timeline?${q}`);
    if (S.instance !== id) return;
    const t1 = performance.now();
    S.tl = tl;
    S.snapshots = tl.snapshots;
    $("instance-error").hidden = true;
    $("view").hidden = false;
    $("inst-title").textContent = id;
    $("inst-meta").textContent = `${fmtCount(tl.events)} events \u00b7 ${fmtTime(tl.first_ns)} \u2013 ${fmtTime(tl.last_ns)} \u00b7 last seq ${tl.last_seq}`;
    renderSnapshots();
    renderMarkers();
    draw();
    const t2 = performance.now();
    S.lastRender = { requestMs: t1 - t0, renderMs: t2 - t1, totalMs: t2 - t0,
      buckets: tl.series.reduce((n, s) => n + s.buckets.length, 0), resolutionNs: tl.resolution_ns };
    document.body.dataset.rendered = String(Date.now());
  } catch (e) {
    if (S.instance !== id) return;
    if (e.code === "unknown_instance" || e.status === 404) {
      $("view").hidden = true;
      $("instance-error").hidden = false;
      $("instance-error-title").textContent = "Unknown instance";
      $("instance-error-text").textContent = e.message;
    } else if (e.code !== "unauthenticated") {
      setProblem("timeline", "Cannot load the timeline: " + e.message);
      return;
    }
  }
  setProblem("timeline", null);
}

const LANE_H = 26, TOP = 34, AXIS = 22, LABEL_W = 120;

function lanes() {
  const tl = S.tl;
  if (!tl) return [];
  const out = tl.series.map((s) => ({ type: "series", s, label: `${s.device} ${s.direction}` }));
  for (const x of tl.sensors) out.push({ type: "sensor", s: x, label: x.name + (x.unit ? ` (${x.unit})` : "") });
  return out;
}

function range() {
  const tl = S.tl;
  return { from: tl.from_ns, to: Math.max(tl.to_ns, tl.from_ns + 1) };
}

function xOf(t, w) { const r = range(); return LABEL_W + (t - r.from) / (r.to - r.from) * (w - LABEL_W - 8); }
function tOf(x, w) { const r = range(); return r.from + (x - LABEL_W) / (w - LABEL_W - 8) * (r.to - r.from); }

const COLORS = { read: "#2563eb", write: "#dc2626", other: "#6b7280", rx: "#059669", tx: "#d97706" };
const MARK = { snapshot: "#2563eb", boot: "#15803d", pause: "#6b7280", resume: "#6b7280", gap: "#d97706",
  crash: "#c62828", triple_fault: "#c62828", internal_error: "#c62828", shutdown: "#374151" };

function draw() {
  const c = $("timeline");
  const tl = S.tl;
  if (!tl) return;
  const ls = lanes();
  const h = TOP + Math.max(1, ls.length) * LANE_H + AXIS + 8;
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth;
  c.style.height = h + "px";
  c.width = Math.floor(w * dpr); c.height = Math.floor(h * dpr);
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  g.font = "12px system-ui, sans-serif";
  const r = range();
  // Lanes.
  const res = tl.resolution_ns;
  ls.forEach((lane, i) => {
    const y = TOP + i * LANE_H;
    g.fillStyle = i % 2 ? "#fafbfc" : "#f3f4f6";
    g.fillRect(LABEL_W, y, w - LABEL_W - 8, LANE_H - 2);
    g.fillStyle = "#374151";
    g.fillText(lane.label, 6, y + 16);
    if (lane.type === "series") {
      const max = lane.s.buckets.reduce((m, b) => Math.max(m, b[1]), 1);
      g.fillStyle = COLORS[lane.s.direction] || "#6b7280";
      for (const [t, n] of lane.s.buckets) {
        const x0 = xOf(t, w), x1 = xOf(t + res, w);
        const bh = Math.max(1, (LANE_H - 4) * Math.sqrt(n / max));
        g.fillRect(x0, y + LANE_H - 2 - bh, Math.max(1, x1 - x0 - 0.5), bh);
      }
    } else {
      const pts = lane.s.points;
      if (pts.length) {
        let lo = Infinity, hi = -Infinity;
        for (const p of pts) { lo = Math.min(lo, p[2]); hi = Math.max(hi, p[3]); }
        if (hi === lo) { hi += 1; lo -= 1; }
        g.strokeStyle = "#7c3aed"; g.lineWidth = 1.5; g.beginPath();
        pts.forEach((p, k) => {
          const x = xOf(p[0] + res / 2, w), yy = y + LANE_H - 3 - (p[1] - lo) / (hi - lo) * (LANE_H - 6);
          if (k) g.lineTo(x, yy); else g.moveTo(x, yy);
        });
        g.stroke();
        g.fillStyle = "#6b7280";
        g.fillText(`${fmtNum(lo)}\u2013${fmtNum(hi)}`, w - 80, y + 12);
      }
    }
  });
  const bottom = TOP + ls.length * LANE_H;
  // The selected range, over the lanes.
  if (S.selection) {
    const a = Math.max(LABEL_W, xOf(S.selection.from, w)), b = Math.min(w - 8, xOf(S.selection.to, w));
    g.fillStyle = "rgba(37,99,235,.16)";
    g.fillRect(Math.min(a, b), TOP - 4, Math.abs(b - a), ls.length * LANE_H + 4);
    g.strokeStyle = "rgba(37,99,235,.6)"; g.lineWidth = 1;
    g.strokeRect(Math.min(a, b), TOP - 4, Math.abs(b - a), ls.length * LANE_H + 4);
  }
  // Markers: snapshots and lifecycle.
  const line = (x, color, label, top) => {
    g.strokeStyle = color; g.lineWidth = 1.5;
    g.beginPath(); g.moveTo(x, top); g.lineTo(x, bottom); g.stroke();
    if (label) { g.fillStyle = color; g.fillText(label, labelX(g, x, label, w), top + 8); }
  };
  for (const s of S.snapshots) {
    if (s.t < r.from || s.t > r.to) continue;
    const x = xOf(s.t, w);
    g.fillStyle = MARK.snapshot;
    g.beginPath(); g.moveTo(x, 4); g.lineTo(x + 5, 10); g.lineTo(x, 16); g.lineTo(x - 5, 10); g.fill();
    line(x, "rgba(37,99,235,.5)", null, 16);
  }
  for (const m of tl.markers) {
    const x = xOf(m.t, w);
    const color = MARK[m.kind] || "#6b7280";
    if (m.kind === "crash" || m.kind === "triple_fault" || m.kind === "internal_error") {
      cross(g, x, 22, color);
      line(x, color, "crash", 28);
    } else if (m.kind === "snapshot") {
      // Drawn from the store's listing when the store has it.
      if (!S.snapshots.some((s) => m.detail === "snapshot " + s.snapshot_id)) {
        g.fillStyle = "rgba(37,99,235,.55)";
        g.beginPath(); g.moveTo(x, 4); g.lineTo(x + 4, 10); g.lineTo(x, 16); g.lineTo(x - 4, 10); g.fill();
      }
    } else if (m.kind === "gap") {
      g.fillStyle = color; g.fillRect(x - 1, 18, 3, 10);
      line(x, "rgba(217,119,6,.7)", "gap", 20);
    } else {
      g.fillStyle = color; g.fillRect(x - 1, 18, 3, 10);
    }
  }
  // The clone: its position and its crash.
  if (S.clone && S.clone.instance_id === S.instance) {
    if (S.clone.position_ns) {
      const x = xOf(S.clone.position_ns, w);
      g.strokeStyle = "#7c3aed"; g.lineWidth = 2; g.setLineDash([4, 3]);
      g.beginPath(); g.moveTo(x, 2); g.lineTo(x, bottom + 4); g.stroke(); g.setLineDash([]);
      g.fillStyle = "#7c3aed"; g.fillText("clone", labelX(g, x, "clone", w), bottom + 2);
    }
    if (S.cloneCrash && S.cloneCrash.t) {
      const x = xOf(S.cloneCrash.t, w);
      cross(g, x, 10, "#7c3aed");
      g.fillStyle = "#7c3aed"; g.fillText("clone crash", labelX(g, x, "clone crash", w), 14);
    }
  }
  // Axis.
  g.fillStyle = "#374151"; g.strokeStyle = "#9ca3af"; g.lineWidth = 1;
  const ticks = 8;
  for (let k = 0; k <= ticks; k++) {
    const t = r.from + (r.to - r.from) * k / ticks;
    const x = xOf(t, w);
    g.beginPath(); g.moveTo(x, bottom); g.lineTo(x, bottom + 4); g.stroke();
    const label = fmtClock(t, r.to - r.from);
    g.fillText(label, Math.max(LABEL_W, Math.min(x - 20, w - 80)), bottom + 16);
  }
  g.fillStyle = "#6b7280";
  g.fillText(`bucket ${fmtDur(res)}`, 6, bottom + 16);
  if (!ls.length) { g.fillStyle = "#6b7280"; g.fillText("no device or sensor events in this range", LABEL_W + 10, TOP + 16); }
}

// A label beside x, on its left when it would not fit on the right.
function labelX(g, x, label, w) {
  const tw = g.measureText(label).width;
  return x + 8 + tw > w - 4 ? x - 8 - tw : x + 8;
}

function cross(g, x, y, color) {
  g.strokeStyle = color; g.lineWidth = 2.5;
  g.beginPath(); g.moveTo(x - 5, y - 5); g.lineTo(x + 5, y + 5); g.moveTo(x + 5, y - 5); g.lineTo(x - 5, y + 5); g.stroke();
}

function renderMarkers() {
  const ul = $("markers");
  ul.textContent = "";
  const items = [];
  for (const s of S.snapshots) items.push({ t: s.t, cls: "m-snapshot", text: `snapshot ${s.snapshot_id} (seq ${s.seq_at_cut})` });
  for (const m of S.tl.markers) {
    if (m.kind === "snapshot" && S.snapshots.some((s) => m.detail === "snapshot " + s.snapshot_id)) continue;
    const crash = m.kind === "crash" || m.kind === "triple_fault" || m.kind === "internal_error";
    items.push({ t: m.t, cls: "m-" + m.kind, text: `${crash ? "crash: " : ""}${m.kind} at seq ${m.seq}${m.detail ? " \u2014 " + m.detail : ""}` });
  }
  if (S.cloneCrash) items.push({ t: S.cloneCrash.t || 0, cls: "m-clone", text: `clone crash: ${S.cloneCrash.kind} after seq ${S.cloneCrash.seq}` });
  items.sort((a, b) => a.t - b.t);
  for (const it of items) {
    const li = document.createElement("li");
    li.className = it.cls;
    li.textContent = `${fmtTime(it.t)}  ${it.text}`;
    ul.append(li);
  }
  if (!items.length) { const li = document.createElement("li"); li.className = "empty"; li.textContent = "No lifecycle markers."; ul.append(li); }
}

function renderSnapshots(force) {
  // Rebuilt only when the listing changed, so an open selection stays put.
  const key = S.instance + "|" + (S.tl.snapshots_error || "") + "|" + S.snapshots.map((s) => s.snapshot_id).join(",");
  if (!force && key === S.snapshotsKey) return;
  S.snapshotsKey = key;
  const ul = $("snapshots");
  ul.textContent = "";
  $("snapshots-empty").hidden = S.snapshots.length > 0;
  $("snapshots-empty").textContent = S.tl.snapshots_error ? "Snapshots unavailable: " + S.tl.snapshots_error : "No snapshots yet.";
  const sel = $("r-snapshot");
  const chosen = sel.value;
  sel.textContent = "";
  const latest = document.createElement("option");
  latest.value = ""; latest.textContent = "latest";
  sel.append(latest);
  for (const s of S.snapshots) {
    const li = document.createElement("li");
    li.className = "pick" + (s.snapshot_id === chosen ? " sel" : "");
    li.dataset.id = s.snapshot_id;
    li.textContent = `${s.snapshot_id} \u00b7 ${fmtTime(s.t)} \u00b7 seq ${s.seq_at_cut} \u00b7 ${s.memory} \u00b7 ${fmtBytes(s.bytes)}`;
    li.onclick = () => { sel.value = s.snapshot_id; renderSnapshots(true); };
    ul.append(li);
    const o = document.createElement("option");
    o.value = s.snapshot_id; o.textContent = s.snapshot_id;
    sel.append(o);
  }
  sel.value = chosen && S.snapshots.some((s) => s.snapshot_id === chosen) ? chosen : "";
  $("r-start").disabled = S.snapshots.length === 0;
  $("r-start").title = S.snapshots.length ? "" : "no snapshots yet";
}

// ---- interaction on the timeline ----------------------------------------

function fullRange() { return { from: S.tl.first_ns, to: Math.max(S.tl.last_ns, S.tl.first_ns + 1) }; }

function setView(from, to) {
  const f = fullRange();
  const span = Math.max(to - from, 10 * NS);
  if (span >= (f.to - f.from)) { S.view = null; } else { S.view = { from, to: from + span }; }
  loadTimeline();
}

function zoom(factor, centerT) {
  if (!S.tl) return;
  const r = range();
  const c = centerT === undefined ? (r.from + r.to) / 2 : centerT;
  const from = c - (c - r.from) * factor, to = c + (r.to - c) * factor;
  setView(from, to);
}

function pan(fraction) {
  if (!S.tl) return;
  const r = range();
  const d = (r.to - r.from) * fraction;
  setView(r.from + d, r.to + d);
}

let drag = null;
function setupTimeline() {
  const c = $("timeline");
  c.addEventListener("wheel", (e) => {
    if (!S.tl) return;
    e.preventDefault();
    const rect = c.getBoundingClientRect();
    zoom(e.deltaY < 0 ? 0.7 : 1.4, tOf(e.clientX - rect.left, rect.width));
  }, { passive: false });
  c.addEventListener("mousedown", (e) => {
    if (!S.tl) return;
    const rect = c.getBoundingClientRect();
    drag = { x: e.clientX, select: e.shiftKey, t0: tOf(e.clientX - rect.left, rect.width), r: range(), w: rect.width };
  });
  window.addEventListener("mousemove", (e) => {
    const rect = c.getBoundingClientRect();
    if (drag && drag.select) {
      const t = tOf(e.clientX - rect.left, rect.width);
      S.selection = { from: Math.min(drag.t0, t), to: Math.max(drag.t0, t) };
      draw();
    } else if (drag) {
      c.style.cursor = "grabbing";
    }
    if (S.tl && e.target === c) {
      const t = tOf(e.clientX - rect.left, rect.width);
      const tip = $("tooltip");
      tip.hidden = false;
      tip.textContent = fmtTime(t);
      tip.style.left = Math.min(e.clientX - rect.left + 10, rect.width - 160) + "px";
      tip.style.top = "2px";
    }
  });
  c.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  window.addEventListener("mouseup", (e) => {
    if (!drag) return;
    const d = drag; drag = null;
    c.style.cursor = "grab";
    if (d.select) {
      if (S.selection && S.selection.to > S.selection.from) loadEvents(S.selection.from, S.selection.to);
    } else if (Math.abs(e.clientX - d.x) > 3) {
      const dt = (e.clientX - d.x) / (d.w - LABEL_W - 8) * (d.r.to - d.r.from);
      setView(d.r.from - dt, d.r.to - dt);
    }
  });
  $("zoom-in").onclick = () => zoom(0.5);
  $("zoom-out").onclick = () => zoom(2);
  $("zoom-fit").onclick = () => { S.view = null; loadTimeline(); };
  window.addEventListener("resize", () => { if (S.tl) draw(); });
}

// ---- events of a range ---------------------------------------------------

function clearEvents() {
  $("events").tBodies[0].textContent = "";
  $("events-empty").hidden = false;
  $("events-empty").textContent = "Shift+drag on the timeline to select a range.";
  $("range-label").textContent = "";
}

async function loadEvents(from, to) {
  const id = S.instance;
  $("range-label").textContent = `${fmtTime(from)} \u2013 ${fmtTime(to)}`;
  $("events-empty").hidden = false;
  $("events-empty").textContent = "Loading\u2026";
  try {
    const r = await api(`/api/instances/${encodeURIComponent(id)}/events?from=${Math.floor(from)}&to=${Math.ceil(to)}&limit=500`);
    const tb = $("events").tBodies[0];
    tb.textContent = "";
    for (const e of r.events) {
      const tr = document.createElement("tr");
      tr.dataset.seq = e.seq;
      for (const v of [e.seq, fmtTime(e.t), e.kind, e.device, detailText(e)]) {
        const td = document.createElement("td"); td.textContent = v; tr.append(td);
      }
      tb.append(tr);
    }
    $("events-empty").hidden = r.events.length > 0;
    $("events-empty").textContent = "No events in this range.";
    if (r.truncated) { $("range-label").textContent += ` (first ${r.events.length})`; }
  } catch (e) {
    $("events-empty").hidden = false;
    $("events-empty").textContent = "Cannot load the events: " + e.message;
  }
}

function detailText(e) {
  switch (e.kind) {
    case "block": return `${e.op} sector ${e.sector} len ${e.len}${e.status !== "ok" ? " " + e.status : ""}`;
    case "net": {
      let s = `${e.direction} ${e.len} B `;
      if (e.proto) {
        s += `${e.proto} ${e.src}${e.src_port != null ? ":" + e.src_port : ""} \u2192 ${e.dst}${e.dst_port != null ? ":" + e.dst_port : ""}`;
        if (e.flags) s += ` [${e.flags}]`;
      } else {
        s += `${e.src_mac} \u2192 ${e.dst_mac} type ${e.ethertype}`;
      }
      if (e.payload_len) s += ` | ${e.preview_text}`;
      return s;
    }
    case "env": return `${e.value}${e.unit ? " " + e.unit : ""}`;
    default: return `${e.lifecycle}${e.detail ? ": " + e.detail : ""}`;
  }
}

// ---- clones --------------------------------------------------------------

async function refreshClones() {
  if (!S.signedIn) return;
  let r;
  try { r = await api("/api/clones"); } catch (e) { return; }
  const ul = $("clones");
  ul.textContent = "";
  for (const c of r.clones) {
    const li = document.createElement("li");
    li.dataset.id = c.clone_id;
    li.className = S.clone && S.clone.clone_id === c.clone_id ? "sel" : "";
    const a = document.createElement("span"); a.textContent = `${c.clone_id}`;
    const b = document.createElement("span"); b.className = "badge" + (c.state === "crashed" ? " crash" : ""); b.textContent = c.state;
    li.append(a, b);
    li.title = `${c.instance_id} from ${c.snapshot_id}`;
    li.onclick = () => { if (c.instance_id !== S.instance) location.hash = "instance=" + encodeURIComponent(c.instance_id); setTimeout(() => showClone(c), 0); };
    ul.append(li);
  }
  $("clones-empty").hidden = r.clones.length > 0;
  if (S.clone && !r.clones.some((c) => c.clone_id === S.clone.clone_id)) {
    $("c-detail").textContent = `Clone ${S.clone.clone_id} is no longer known to the replayer.`;
    S.clone.state = "gone";
    renderClone();
  }
}

function showClone(c) {
  if (S.cloneWatch) { S.cloneWatch.abort(); S.cloneWatch = null; }
  S.clone = c;
  S.cloneCrash = null;
  $("c-console").textContent = "";
  $("c-divergences").textContent = "";
  $("c-div-empty").hidden = false;
  renderClone();
  if (c) { watchClone(c.clone_id); loadDivergences(c.clone_id); }
}

async function reloadClone(id) {
  try {
    const c = await api(`/api/clones/${encodeURIComponent(id)}`);
    showClone(c);
  } catch (e) {
    if (S.clone && S.clone.clone_id === id) {
      S.clone.state = "gone";
      $("c-detail").textContent = `Clone ${id} is no longer known to the replayer (${e.message}).`;
      renderClone(true);
    }
  }
}

function renderClone(keepDetail) {
  const c = S.clone;
  $("clone-none").hidden = !!c;
  $("clone-panel").hidden = !c;
  $("c-id").textContent = c ? c.clone_id : "";
  if (!c) return;
  const st = $("c-state");
  st.className = "state " + c.state;
  st.textContent = `${c.state} \u00b7 replayed seq ${c.replayed_seq} \u00b7 ${c.delivered} delivered \u00b7 ${c.divergences} divergences \u00b7 ${c.fast ? "as fast as possible" : (c.speed || 1) + "x"}`;
  if (!keepDetail && c.state !== "gone") $("c-detail").textContent = c.detail || (c.access_hint ? "live: " + c.access_hint : `from snapshot ${c.snapshot_id} (seq ${c.seq_at_cut})`);
  const over = ["crashed", "failed", "stopped", "gone"].includes(c.state);
  // Nothing can be asked of a replayer that does not answer.
  const en = (id, on) => { $(id).disabled = !on || S.replayerOk === false; };
  en("c-start", c.state === "ready");
  en("c-pause", c.state === "replaying");
  en("c-resume", c.state === "paused");
  en("c-step", ["ready", "paused", "replaying"].includes(c.state));
  en("c-runto-go", ["ready", "paused", "replaying"].includes(c.state));
  en("c-speed-go", !over && c.state !== "finished" && c.state !== "live");
  en("c-switch", c.state !== "gone");
  en("c-live", !over && c.state !== "live");
  en("c-stop", !over && c.state !== "live");
  en("c-delete", c.state !== "gone");
  if (S.tl) { draw(); renderMarkers(); }
}

async function watchClone(id) {
  const ctl = new AbortController();
  S.cloneWatch = ctl;
  let r;
  try {
    r = await fetch(`/api/clones/${encodeURIComponent(id)}/watch`, { headers: { "Authorization": "Bearer " + S.token }, signal: ctl.signal });
  } catch (e) {
    if (e.name !== "AbortError") setProblem("watch", "The console server is unreachable; retrying");
    return;
  }
  if (!r.ok) {
    let m = "HTTP " + r.status; try { m = (await r.json()).error; } catch (e) { /* keep */ }
    if (r.status === 503) setProblem("replayer", unreachable(m));
    return;
  }
  setProblem("watch", null);
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        let ev = "message", data = "";
        for (const line of chunk.split("\n")) {
          if (line.startsWith("event:")) ev = line.slice(6).trim();
          else if (line.startsWith("data:")) data += (data ? "\n" : "") + line.slice(5).replace(/^ /, "");
        }
        onWatch(id, ev, data);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return;
  }
  if (S.cloneWatch === ctl && S.clone && S.clone.clone_id === id && !["crashed", "failed", "stopped", "gone"].includes(S.clone.state)) {
    // The stream ended early: the replayer or the console went away.
    S.cloneWatch = null;
  }
}

function onWatch(id, ev, data) {
  if (!S.clone || S.clone.clone_id !== id) return;
  if (ev === "failure") {
    let m = data; try { m = JSON.parse(data).error; } catch (e) { /* keep */ }
    setProblem("replayer", "Replayer unreachable: the watch of clone " + id + " broke off (" + m + ")");
    S.replayerOk = false;
    S.clone.state = "gone";
    $("c-detail").textContent = "Lost contact with the replayer during the replay.";
    renderClone(true);
    return;
  }
  if (ev !== "progress") return;
  const p = JSON.parse(data);
  if (p.clone && S.clone.switches !== undefined && p.clone.switches !== S.clone.switches) {
    // A switch restarted the clone from another cut: its console and its
    // divergences start again with the new run.
    $("c-console").textContent = "";
    $("c-divergences").textContent = "";
    $("c-div-empty").hidden = false;
    S.cloneCrash = null;
  }
  if (p.clone) Object.assign(S.clone, p.clone);
  if (p.console) {
    const pre = $("c-console");
    pre.textContent += p.console;
    pre.scrollTop = pre.scrollHeight;
  }
  if (p.divergence) addDivergence(p.divergence);
  if (p.lifecycle && ["crash", "triple_fault", "internal_error"].includes(p.lifecycle.kind)) {
    S.cloneCrash = { t: p.lifecycle.position_ns, seq: p.lifecycle.last_seq_applied, kind: p.lifecycle.kind };
  }
  if (S.clone.state === "crashed" && !S.cloneCrash) {
    S.cloneCrash = { t: S.clone.position_ns, seq: S.clone.replayed_seq, kind: "crash" };
  }
  renderClone();
  refreshCloneBadge();
}

function refreshCloneBadge() {
  for (const li of $("clones").children) {
    if (S.clone && li.dataset.id === S.clone.clone_id) {
      const b = li.lastChild; b.textContent = S.clone.state; b.className = "badge" + (S.clone.state === "crashed" ? " crash" : "");
    }
  }
}

function addDivergence(d) {
  const li = document.createElement("li");
  li.textContent = `seq ${d.seq} ${d.device} ${d.kind}: ${d.description}`;
  $("c-divergences").append(li);
  $("c-div-empty").hidden = true;
}

async function loadDivergences(id) {
  try {
    const r = await api(`/api/clones/${encodeURIComponent(id)}/divergences`);
    if (!S.clone || S.clone.clone_id !== id) return;
    $("c-divergences").textContent = "";
    for (const d of r.divergences) addDivergence(d);
    $("c-div-empty").hidden = r.divergences.length > 0;
  } catch (e) { /* shown elsewhere */ }
}

async function control(action, extra = {}) {
  if (!S.clone) return;
  try {
    const c = await api(`/api/clones/${encodeURIComponent(S.clone.clone_id)}/control`, { method: "POST", body: Object.assign({ action }, extra) });
    Object.assign(S.clone, c);
    setProblem("control", null);
    renderClone();
    refreshCloneBadge();
    if (!S.cloneWatch) watchClone(S.clone.clone_id);
  } catch (e) {
    setProblem("control", `${action.replace("_", " ")} refused: ${e.message}`);
    setTimeout(() => setProblem("control", null), 8000);
  }
}

function setupControls() {
  $("c-start").onclick = () => control("start");
  $("c-pause").onclick = () => control("pause");
  $("c-resume").onclick = () => control("resume");
  $("c-step").onclick = () => control("step", { steps: 1 });
  $("c-runto-go").onclick = () => control("run_to", { run_to_seq: Number($("c-runto").value) || 0 });
  $("c-speed-go").onclick = () => control("set_speed", { speed: Number($("c-speed").value) || 1 });
  $("c-switch").onclick = () => control("switch_snapshot", { snapshot_id: $("r-snapshot").value || undefined, start: !$("r-paused").checked });
  $("c-live").onclick = () => control("go_live");
  $("c-stop").onclick = () => control("stop");
  $("c-delete").onclick = async () => {
    if (!S.clone) return;
    try {
      await api(`/api/clones/${encodeURIComponent(S.clone.clone_id)}`, { method: "DELETE" });
      showClone(null);
      refreshClones();
    } catch (e) { setProblem("control", "delete refused: " + e.message); }
  };
  $("r-snapshot").addEventListener("change", () => { if (S.tl) renderSnapshots(true); });
  $("replay-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = { instance_id: S.instance, start_paused: $("r-paused").checked,
      from_seq: Number($("r-from").value) || 0, to_seq: Number($("r-to").value) || 0, seed: Number($("r-seed").value) || 0 };
    if ($("r-snapshot").value) body.snapshot_id = $("r-snapshot").value;
    if ($("r-fast").checked) body.fast = true; else body.speed = Number($("r-speed").value) || 1;
    if (!($("r-block").checked && $("r-net").checked && $("r-env").checked)) {
      body.filter = { block: $("r-block").checked, net: $("r-net").checked, env: $("r-env").checked };
    }
    const kind = $("r-fault").value;
    if (kind) {
      body.faults = [{ kind, at_seq: $("r-fault-seq").value.split(",").map((x) => Number(x.trim())).filter((x) => x > 0),
        probability: Number($("r-fault-p").value) || 0, delay_ms: Number($("r-fault-delay").value) || 0 }];
    }
    $("r-start").disabled = true;
    $("r-start").textContent = "Restoring\u2026";
    try {
      const c = await api("/api/clones", { method: "POST", body });
      setProblem("control", null);
      showClone(c);
      refreshClones();
    } catch (e2) {
      setProblem("control", "Replay not started: " + e2.message);
      setTimeout(() => setProblem("control", null), 10000);
    } finally {
      $("r-start").disabled = S.snapshots.length === 0;
      $("r-start").textContent = "Start replay";
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || e.target.tagName === "TEXTAREA") return;
    if (e.key === " ") {
      e.preventDefault();
      if (!S.clone) return;
      if (S.clone.state === "replaying") control("pause");
      else if (S.clone.state === "paused") control("resume");
      else if (S.clone.state === "ready") control("start");
    } else if (e.key === "s" || e.key === "S" || e.key === ".") {
      if (S.clone && ["ready", "paused", "replaying"].includes(S.clone.state)) control("step", { steps: 1 });
    } else if (e.key === "+" || e.key === "=") zoom(0.5);
    else if (e.key === "-") zoom(2);
    else if (e.key === "0") { S.view = null; loadTimeline(); }
    else if (e.key === "ArrowLeft") pan(-0.25);
    else if (e.key === "ArrowRight") pan(0.25);
  });
}

// ---- formatting ----------------------------------------------------------

function fmtCount(n) { return n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : n >= 1e4 ? (n / 1e3).toFixed(0) + "k" : String(n); }
function fmtNum(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2); }
function fmtBytes(b) { return b >= 1 << 20 ? (b / (1 << 20)).toFixed(1) + " MiB" : (b / 1024).toFixed(0) + " KiB"; }
function fmtDur(ns) { return ns >= 6e10 ? ns / 6e10 + " min" : ns >= 1e9 ? ns / 1e9 + " s" : ns / 1e6 + " ms"; }
function fmtTime(ns) {
  if (!ns) return "-";
  const d = new Date(ns / NS);
  return d.toISOString().replace("T", " ").replace("Z", "").slice(0, 23);
}
function fmtClock(ns, span) {
  const d = new Date(ns / NS);
  const s = d.toISOString();
  return span < 5e9 ? s.slice(17, 23) : span < 864e11 ? s.slice(11, 19) : s.slice(5, 16).replace("T", " ");
}

// ---- start ---------------------------------------------------------------

function start() {
  setupTimeline();
  setupControls();
  $("signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token").value.trim()); });
  $("signout").onclick = () => { sessionStorage.removeItem("vmr.token"); S.token = ""; signedOut("Signed out."); };
  window.addEventListener("hashchange", route);
  if (S.token) signIn(S.token); else signedOut("");
  setInterval(refreshHealth, 2000);
  setInterval(refreshInstances, 3000);
  setInterval(refreshClones, 3000);
  setInterval(() => {
    // Follow the recording while the whole of it is shown; keep a zoomed view still.
    if (S.signedIn && S.instance && !S.view && !drag) loadTimeline();
  }, 2000);
  setInterval(() => {
    // Reattach to the shown clone's progress after the replayer came back.
    if (S.clone && !S.cloneWatch && S.replayerOk && !["crashed", "failed", "stopped", "gone"].includes(S.clone.state)) watchClone(S.clone.clone_id);
  }, 2000);
}

start();
