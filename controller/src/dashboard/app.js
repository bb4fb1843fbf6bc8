// Musubi's dashboard: no framework, nothing fetched but this controller's API.
"use strict";

const LABELS = {
  ok: "正常 / ok",
  degraded: "一部障害 / degraded",
  down: "停止 / down",
  offline: "未接続 / offline",
  never: "未登録 / never seen",
  revoked: "失効 / revoked",
};
const ORDER = ["ok", "degraded", "down", "offline", "never", "revoked"];
const rows = new Map();
const COMPACT_ABOVE = 400;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function tile(row) {
  const b = el("button", { class: "tile" + (row.role === "access-point" ? " ap" : ""), id: "site-" + row.site, type: "button" });
  paint(b, row);
  b.addEventListener("click", () => detail(row.site));
  return b;
}

function paint(b, row) {
  b.setAttribute("data-state", row.state);
  // An agent not connected: its last report's peers are not news.
  const live = row.state !== "offline" && row.state !== "never";
  const peers = row.peers && live ? ` ${row.peers_up}/${row.peers}` : "";
  b.textContent = row.site + peers;
  b.title = `${row.site} (${row.tenant}): ${LABELS[row.state]}, peers ${row.peers_up}/${row.peers}, revision ${row.applied}/${row.desired}`;
  b.setAttribute("aria-label", b.title);
}

function place(row) {
  const region = document.querySelector(`#region-${row.region} ${row.role === "access-point" ? ".aps" : ".sites"}`);
  region.append(tile(row));
}

// Sites by state, as the controller counted them (a large fleet's page
// holds only some of the rows).
function counts(by) {
  const ul = document.getElementById("counts");
  ul.replaceChildren(...ORDER.filter((s) => by[s]).map((s) => el("li", { "data-state": s, id: "count-" + s }, `${LABELS[s]}: ${by[s]}`)));
}

// Every row (s.partial false), or — a large fleet — the access points and
// the sites not ok, the others on demand ("show every site").
function summary(s) {
  const received = performance.now();
  document.getElementById("revision").textContent = s.revision;
  document.getElementById("map").classList.toggle("compact", s.total > COMPACT_ABOVE);
  for (const r of document.querySelectorAll(".aps, .sites")) r.replaceChildren();
  rows.clear();
  const frag = { east: [[], []], west: [[], []] };
  for (const r of s.rows) {
    rows.set(r.site, r);
    frag[r.region][r.role === "access-point" ? 0 : 1].push(tile(r));
  }
  for (const region of ["east", "west"]) {
    document.querySelector(`#region-${region} .aps`).append(...frag[region][0]);
    document.querySelector(`#region-${region} .sites`).append(...frag[region][1]);
  }
  counts(s.counts);
  const more = document.getElementById("more");
  more.hidden = !s.partial;
  if (s.partial) {
    const hidden = s.total - s.rows.length;
    more.replaceChildren(
      el("span", {}, `正常な拠点 ${hidden} か所は省略 / ${hidden} sites ok, not drawn `),
      el("button", { type: "button", id: "show-all", onclick: showAll }, "すべて表示 / show every site"));
  }
  // For the browser test: when the rows arrived, how long drawing them took.
  window.musubiRender = { rows: s.rows.length, received_ms: received, rendered_ms: performance.now() };
  document.body.setAttribute("data-loaded", String(s.total));
}

async function showAll() {
  const s = await (await fetch("/api/summary")).json();
  summary({ ...s, total: s.rows.length, partial: false, counts: tally(s.rows) });
}

function tally(list) {
  const by = {};
  for (const r of list) by[r.state] = (by[r.state] || 0) + 1;
  return by;
}

function changes(c) {
  document.getElementById("revision").textContent = c.revision;
  for (const r of c.rows) {
    rows.set(r.site, r);
    const b = document.getElementById("site-" + r.site);
    if (b) paint(b, r); else place(r);
  }
  counts(c.counts);
  const open = document.getElementById("detail").dataset.site;
  if (open && c.rows.some((r) => r.site === open)) detail(open);
}

async function detail(site) {
  const section = document.getElementById("detail");
  section.hidden = false;
  section.dataset.site = site;
  const res = await fetch("/api/site/" + encodeURIComponent(site));
  if (!res.ok) return;
  const s = await res.json();
  const st = (s.reported && s.reported.status) || {};
  const row = rows.get(site) || {};
  const seen = (s.reported || {}).last_seen_unix_ms;
  const when = s.connected ? "" : ` — 最後の報告 / last report ${seen ? new Date(Number(seen)).toISOString() : "–"}`;
  const peers = el("table", {},
    el("caption", {}, "ピア / peers" + when),
    el("tr", {}, ...["セグメント / segment", "ピア / peer", "状態 / state", "RTT (ms)", "損失 / loss", "経路 / path"].map((h) => el("th", { scope: "col" }, h))),
    ...(st.peers || []).map((p) => el("tr", {},
      el("td", {}, p.segment), el("td", {}, p.peer),
      el("td", { class: p.up ? "up" : "down" }, p.up ? "up" : "down"),
      el("td", {}, ((p.rtt_us || 0) / 1000).toFixed(2)),
      el("td", {}, ((p.loss_permille || 0) / 10).toFixed(1) + " %"),
      el("td", {}, p.path || "–"))));
  const active = el("table", {},
    el("caption", {}, "使用中の経路 / paths in use"),
    el("tr", {}, ...["セグメント / segment", "経路群 / route group", "ピア / peer", "回線 / line", "移動 / moves"].map((h) => el("th", { scope: "col" }, h))),
    ...(st.active || []).map((a) => el("tr", {}, el("td", {}, a.segment), el("td", {}, a.route_group), el("td", {}, a.peer), el("td", {}, a.local_line || "–"), el("td", {}, String(a.moves || 0)))));
  const facts = el("dl", {},
    el("dt", {}, "状態 / state"), el("dd", { id: "detail-state" }, LABELS[row.state] || "–"),
    el("dt", {}, "接続 / connected"), el("dd", {}, s.connected ? `yes (${(s.reported || {}).controller || ""})` : "no"),
    el("dt", {}, "適用 / applied vs desired revision"), el("dd", {}, `${st.applied_revision || 0} / ${s.desired_revision || 0}`),
    el("dt", {}, "エージェント / agent"), el("dd", {}, (s.reported || {}).agent_version || "–"),
    el("dt", {}, "エラー / errors"), el("dd", {}, (st.errors || []).join("; ") || "なし / none"));
  document.getElementById("detail-title").textContent = `拠点 / Site: ${site}`;
  document.getElementById("detail-body").replaceChildren(facts, peers, active);
}

// verify's matrix, by segment: what an endpoint of the row's segment may
// send to one of the column's (it depends only on the two segments).
async function segments() {
  const s = await (await fetch("/api/segments")).json();
  const flows = (from, to) => s.policies.filter((p) => p.from === from && p.to === to).map((p) => p.flow);
  const cell = (from, to) => {
    if (from === to) return el("td", { class: "up", title: "same segment: everything" }, "● all");
    const f = flows(from, to);
    return f.length ? el("td", { title: "policies allow" }, "◐ " + f.join(", ")) : el("td", { class: "none" }, "·");
  };
  const matrix = el("table", { id: "matrix" },
    el("caption", {}, "到達性（送信元 → 宛先） / reachability (from → to): ● 同一セグメント / same segment, ◐ ポリシーが許可 / policy allows, · なし / nothing"),
    el("tr", {}, el("th", { scope: "col" }, "from \\ to"), ...s.segments.map((to) => el("th", { scope: "col" }, to))),
    ...s.segments.map((from) => el("tr", {}, el("th", { scope: "row" }, from), ...s.segments.map((to) => cell(from, to)))));
  const t = el("table", {},
    el("caption", {}, "ポリシー / policies"),
    el("tr", {}, ...["ポリシー / policy", "送信元 / from", "宛先 / to", "通信 / flow"].map((h) => el("th", { scope: "col" }, h))),
    ...s.policies.map((p) => el("tr", {}, el("td", {}, p.policy), el("td", {}, p.from), el("td", {}, p.to), el("td", {}, p.flow))));
  document.getElementById("segments").replaceChildren(matrix, t);
}

async function history() {
  const h = await (await fetch("/api/history")).json();
  const t = el("table", {},
    el("tr", {}, ...["版 / revision", "時刻 / time", "実施者 / actor", "内容 / change"].map((x) => el("th", { scope: "col" }, x))),
    ...h.slice(0, 30).map((e) => el("tr", {}, el("td", {}, String(e.revision)), el("td", {}, new Date(e.time_ms).toISOString()), el("td", {}, e.actor), el("td", {}, e.summary))));
  document.getElementById("history").replaceChildren(t);
}

async function drills() {
  const d = await (await fetch("/api/drills")).json();
  if (!d.length) return;
  const t = el("table", {},
    el("tr", {}, ...["訓練 / drill", "結果 / result", "最大断 / worst outage", "報告 / report"].map((x) => el("th", { scope: "col" }, x))),
    ...d.map((r) => el("tr", {}, el("td", {}, r.drill), el("td", { class: r.pass ? "up" : "down" }, r.pass ? "合格 / pass" : "不合格 / fail"),
      el("td", {}, Math.round(r.worst_outage_ms) + " ms"),
      el("td", {}, el("a", { href: "/drills/" + r.file + ".svg" }, "SVG"), " ", el("a", { href: "/drills/" + r.file + ".json" }, "JSON")))));
  document.getElementById("drills").replaceChildren(t);
}

function live() {
  const status = document.getElementById("live");
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => { status.dataset.live = "open"; status.textContent = "ライブ / live"; });
  events.addEventListener("error", () => { status.dataset.live = "closed"; status.textContent = "再接続中 / reconnecting"; });
  events.addEventListener("summary", (e) => summary(JSON.parse(e.data)));
  events.addEventListener("changes", (e) => { changes(JSON.parse(e.data)); history(); });
}

live();
segments();
history();
drills();
