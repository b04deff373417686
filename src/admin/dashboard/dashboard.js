// ringtunnel's live dashboard: polls /stats?limit=.. once a second and
// draws tables and small SVG charts. Plain JavaScript, no dependencies.
// Everything that comes from /stats is written with textContent (session
// names are agents' input).
"use strict";

const PAGE = 25;          // session rows per page
const HISTORY = 60;       // polls kept for the sparklines
const TOKEN_KEY = "ringtunnel-admin-token";
const SVG = "http://www.w3.org/2000/svg";

const state = {
  offset: 0,
  filter: "",
  prev: null,             // the previous poll: {t, requests, errors}
  history: { rps: [], streams: [], conns: [], uplinks: [], sessions: [], errors: [] },
  timer: null,
};

const $ = (id) => document.getElementById(id);

// The token: from the fragment (#token=...) once, then from this tab's
// sessionStorage. The fragment is removed from the address bar.
function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function fmtRate(x) {
  if (x >= 100) return Math.round(x).toString();
  if (x >= 10) return x.toFixed(1);
  return x.toFixed(2);
}

function fmtUs(us) {
  if (!us) return "–";
  if (us < 1000) return us + " µs";
  if (us < 1e6) return (us / 1000).toFixed(us < 1e4 ? 2 : 1) + " ms";
  return (us / 1e6).toFixed(2) + " s";
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}

// A sparkline of `values` in `svg` (viewBox units; the CSS sizes it).
function sparkline(svg, values, w, h) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  if (values.length < 2) return;
  const max = Math.max(1, ...values);
  const step = w / (values.length - 1);
  const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(h - 1 - (v / max) * (h - 2)).toFixed(1)}`);
  svg.appendChild(svgEl("polygon", { points: `0,${h} ${pts.join(" ")} ${w},${h}` }));
  svg.appendChild(svgEl("polyline", { points: pts.join(" ") }));
}

// Bars of a histogram: labels are the buckets' upper bounds.
function bars(svg, bounds, counts) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const w = 400, h = 170, pad = 16;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const total = counts.reduce((a, b) => a + b, 0);
  // Up to the last non-empty bucket (at least 8), so the bars stay wide.
  let last = counts.length - 1;
  while (last > 7 && counts[last] === 0) last--;
  const n = last + 1;
  const bw = (w - 8) / n;
  const max = Math.max(1, ...counts.slice(0, n));
  for (let i = 0; i < n; i++) {
    const bh = (counts[i] / max) * (h - 2 * pad - 4);
    const r = svgEl("rect", { x: 4 + i * bw + 1, y: h - pad - bh, width: Math.max(1, bw - 2), height: bh });
    const tip = svgEl("title", {});
    const label = i < bounds.length ? `≤ ${bounds[i]}` : `> ${bounds[bounds.length - 1]}`;
    tip.textContent = `${label} frames: ${counts[i]} writev calls`;
    r.appendChild(tip);
    svg.appendChild(r);
    const t = svgEl("text", { x: 4 + i * bw + bw / 2, y: h - 4, "text-anchor": "middle" });
    t.textContent = i < bounds.length ? bounds[i] : "+";
    svg.appendChild(t);
  }
  const cap = svgEl("text", { x: w - 6, y: 12, "text-anchor": "end" });
  cap.textContent = `${total} writev calls`;
  svg.appendChild(cap);
}

function push(series, v) {
  series.push(v);
  if (series.length > HISTORY) series.shift();
}

function sum(cores, key) {
  return cores.reduce((a, c) => a + (c[key] || 0), 0);
}

function setStatus(text, bad) {
  const s = $("status");
  s.textContent = text;
  s.className = bad ? "status bad" : "status";
}

function renderCards(stats, page) {
  const cores = stats.cores;
  const now = performance.now();
  const requests = sum(cores, "requests");
  const errors = cores.reduce((a, c) => a + Object.values(c.errors).reduce((x, y) => x + y, 0), 0);
  let rps = 0, eps = 0;
  if (state.prev) {
    const dt = (now - state.prev.t) / 1000;
    if (dt > 0) {
      rps = Math.max(0, requests - state.prev.requests) / dt;
      eps = Math.max(0, errors - state.prev.errors) / dt;
    }
  }
  const values = {
    rps: rps,
    streams: sum(cores, "active_streams"),
    conns: sum(cores, "public_connections"),
    uplinks: sum(cores, "uplinks"),
    sessions: page ? page.total : 0,
    errors: eps,
  };
  for (const k in values) {
    push(state.history[k], values[k]);
    $("c-" + k).textContent = (k === "rps" || k === "errors") ? fmtRate(values[k]) : String(values[k]);
    sparkline($("s-" + k), state.history[k], 120, 28);
  }
  state.prev = { t: now, requests, errors };
}

function renderSessions(stats) {
  const page = stats.sessions_page;
  const panel = $("sessions-panel");
  panel.hidden = !page;
  if (!page) return;
  const body = $("sessions").tBodies[0];
  const rows = [];
  for (const s of page.rows) {
    const tr = el("tr");
    tr.dataset.session = s.name;
    tr.appendChild(el("td", s.name, "name"));
    tr.appendChild(el("td", s.uplinks_per_core.join(" · "), "uplinks"));
    tr.appendChild(el("td", fmtRate(s.rps), "num rps"));
    tr.appendChild(el("td", fmtRate(s.rps_1m), "num"));
    tr.appendChild(el("td", fmtUs(s.p50_us), "num p50"));
    tr.appendChild(el("td", fmtUs(s.p99_us), "num p99"));
    tr.appendChild(el("td", String(s.errors), s.errors > 0 ? "num errors bad" : "num errors"));
    const td = el("td", undefined, "chart");
    const svg = svgEl("svg", { class: "spark" });
    // The last second is still filling: leave it out of the chart.
    sparkline(svg, s.series.slice(0, -1), 180, 20);
    td.appendChild(svg);
    tr.appendChild(td);
    rows.push(tr);
  }
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", page.total ? "no session matches the filter" : "no session connected", "note");
    td.colSpan = 8;
    tr.appendChild(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const first = page.matched ? page.offset + 1 : 0;
  const last = page.offset + page.rows.length;
  let info = `${first}–${last} of ${page.matched}`;
  if (page.matched !== page.total) info += ` (filtered from ${page.total})`;
  $("page-info").textContent = info;
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.matched;
  const un = $("untracked");
  un.hidden = !(stats.window && stats.window.untracked > 0);
  if (!un.hidden) {
    un.textContent = `${stats.window.untracked} session openings found no window slot ` +
      `(at most ${stats.window.max_sessions_per_core} sessions per core are tracked).`;
  }
  // A page past the end (sessions went away): go back to the last page.
  if (page.offset > 0 && page.rows.length === 0 && page.matched > 0) {
    state.offset = Math.max(0, Math.floor((page.matched - 1) / PAGE) * PAGE);
  }
}

function renderCores(stats) {
  const rows = stats.cores.map((c) => {
    const tr = el("tr");
    for (const [v, cls] of [
      [c.core, ""], [c.public_connections, "num"], [c.active_streams, "num"],
      [c.uplinks, "num"], [c.requests, "num"], [c.handoffs_out, "num"],
      [c.queue_depth, "num"], [c.frames_per_writev.p50, "num"],
    ]) tr.appendChild(el("td", String(v), cls));
    return tr;
  });
  $("cores").tBodies[0].replaceChildren(...rows);
}

function renderErrors(stats) {
  const totals = {};
  for (const c of stats.cores) {
    for (const k in c.errors) totals[k] = (totals[k] || 0) + c.errors[k];
  }
  const last = state.lastErrors || {};
  const rows = Object.keys(totals).filter((k) => totals[k] > 0).sort((a, b) => totals[b] - totals[a]).map((k) => {
    const tr = el("tr");
    tr.appendChild(el("td", k, "name"));
    tr.appendChild(el("td", String(totals[k]), "num"));
    const d = last[k] === undefined ? 0 : totals[k] - last[k];
    tr.appendChild(el("td", String(d), d > 0 ? "num bad" : "num"));
    return tr;
  });
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", "no errors", "note");
    td.colSpan = 3;
    tr.appendChild(td);
    rows.push(tr);
  }
  $("errors").tBodies[0].replaceChildren(...rows);
  state.lastErrors = totals;
}

async function poll() {
  state.timer = null;
  const q = `limit=${PAGE}&offset=${state.offset}&q=${encodeURIComponent(state.filter)}`;
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  try {
    const r = await fetch("/stats?" + q, { headers, cache: "no-store" });
    if (r.status === 401) {
      $("auth").hidden = false;
      $("main").hidden = true;
      setStatus(token() ? "the admin token was refused" : "admin token required", true);
      return; // polling resumes when a token is entered
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    const stats = await r.json();
    $("auth").hidden = true;
    $("main").hidden = false;
    $("role").textContent = stats.role;
    renderCards(stats, stats.sessions_page);
    renderSessions(stats);
    renderCores(stats);
    renderErrors(stats);
    const h = stats.frames_per_writev_hist;
    if (h) bars($("writev"), h.bounds, h.counts);
    setStatus("updated " + new Date().toLocaleTimeString(), false);
  } catch (e) {
    setStatus("cannot read /stats: " + e.message, true);
  }
  schedule();
}

function schedule() {
  if (state.timer === null) state.timer = setTimeout(poll, 1000);
}

function now() {
  if (state.timer !== null) clearTimeout(state.timer);
  state.timer = null;
  poll();
}

function init() {
  takeTokenFromFragment();
  // A link with a token opened in this tab changes only the fragment.
  window.addEventListener("hashchange", () => { takeTokenFromFragment(); now(); });
  $("token-save").addEventListener("click", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    now();
  });
  $("token").addEventListener("keydown", (e) => { if (e.key === "Enter") $("token-save").click(); });
  let debounce = null;
  $("filter").addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => {
      state.filter = $("filter").value.trim().toLowerCase();
      state.offset = 0;
      now();
    }, 200);
  });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); now(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; now(); });
  poll();
}

document.addEventListener("DOMContentLoaded", init);
