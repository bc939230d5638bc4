// The traffic graph page. Reads /graph.json every second and draws it as SVG.
//
// Every name in the data (workloads, identities, labels, policies, reasons) is put into the
// page with textContent or setAttribute, never parsed as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;
const PHONE = 700;

const state = {
  graph: null,
  text: "",
  selected: null, // { kind: "edge" | "node", id }
  generation: 0,
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// Icons, drawn around (0, 0) in a 20 x 20 box.
function lockIcon(closed) {
  const g = svg("g", { class: closed ? "lock lock-closed" : "lock lock-open" });
  g.append(
    svg("path", {
      class: "shackle",
      d: closed ? "M-3.6 -1 V-4.2 A3.6 3.6 0 0 1 3.6 -4.2 V-1" : "M-3.6 -1 V-6.2 A3.6 3.6 0 0 1 3.6 -6.2 V-4.6",
    }),
    svg("rect", { class: "body", x: -5.6, y: -1.4, width: 11.2, height: 8.8, rx: 1.8 }),
    svg("circle", { class: "keyhole", cx: 0, cy: 2.6, r: 1.3 }),
  );
  return g;
}

function droppedIcon() {
  const g = svg("g", { class: "mark-dropped" });
  g.append(svg("circle", { r: 7 }), svg("path", { d: "M-3 -3 L3 3 M3 -3 L-3 3" }));
  return g;
}

function edgeIcon(edge) {
  if (edge.outcome === "dropped") return droppedIcon();
  return lockIcon(edge.security === "mutual_tls");
}

function iconSvg(icon, size) {
  const box = svg("svg", { viewBox: "-10 -10 20 20", width: size, height: size, "aria-hidden": "true" });
  box.append(icon);
  return box;
}

function nodeIcon(node) {
  const g = svg("g", {});
  if (node.kind === "workload") {
    g.append(svg("path", { class: "nodeicon", d: "M0 -8 L7 -4 V4 L0 8 L-7 4 V-4 Z M-7 -4 L0 0 L7 -4 M0 0 V8" }));
  } else {
    g.append(svg("circle", { class: "nodeicon", r: 8 }));
    g.append(svg("text", { class: "nodeicon-text", "text-anchor": "middle", y: 4.3 }, node.kind === "unknown" ? "?" : "↗"));
  }
  return g;
}

// Formatting.
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// "plaintext allowed: PERMISSIVE by ns/name" → "PERMISSIVE by ns/name".
function policyText(edge) {
  const text = edge.policies[0] || "";
  return text.replace(/^plaintext (allowed|refused): /, "");
}

function securityText(edge) {
  if (edge.outcome === "dropped") return "dropped";
  return edge.security === "mutual_tls" ? "mutual TLS" : "plaintext";
}

function edgeClass(edge) {
  return edge.outcome === "dropped" ? "dropped" : edge.security;
}

function countText(edge) {
  return edge.outcome === "dropped" ? `${edge.connections} dropped` : plural(edge.connections, "conn");
}

function nodeById(id) {
  return state.graph.nodes.find((n) => n.id === id);
}

// How a node is named in sentences: `ns/name`, `unknown 198.18.0.11`, `outside 1.2.3.4`.
function displayName(node) {
  if (node.kind === "workload") return node.label;
  return `${node.kind === "unknown" ? "unknown" : "outside"} ${node.label}`;
}

function nodeTitle(node) {
  if (node.kind === "workload") return node.name || node.label;
  return node.kind === "unknown" ? "unknown caller" : "outside the mesh";
}

function nodeSubtitle(node) {
  if (node.kind === "workload") {
    if (node.namespace) return `${node.namespace}${node.local ? " · on this node" : ""}`;
    return "meshed workload";
  }
  return node.address || node.label;
}

function nodeThirdLine(node) {
  if (node.kind === "workload") return node.identity ? shortIdentity(node.identity) : "";
  return node.kind === "unknown" ? "plaintext caller" : "destination";
}

function shortIdentity(identity) {
  const match = /^spiffe:\/\/[^/]+\/(.*)$/.exec(identity);
  if (!match) return identity;
  return match[1].replace(/^ns\//, "");
}

// Fits a text element into `width` pixels, ending with "…" when cut.
function fitText(text, full, width) {
  text.textContent = full;
  if (text.getComputedTextLength() <= width) return;
  let lo = 0;
  let hi = full.length;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    text.textContent = full.slice(0, mid) + "…";
    if (text.getComputedTextLength() <= width) lo = mid;
    else hi = mid - 1;
  }
  text.textContent = full.slice(0, lo) + "…";
}

// Layout: columns (or rows on a phone) by rank, callers first.
function layout(graph, width, room) {
  const vertical = width < PHONE;
  const nodes = graph.nodes;
  const rank = new Map(nodes.map((n) => [n.id, 0]));
  for (let round = 0; round < nodes.length; round += 1) {
    let changed = false;
    for (const e of graph.edges) {
      if (e.source === e.target) continue;
      const r = rank.get(e.source) + 1;
      if (r > rank.get(e.target) && r < nodes.length) {
        rank.set(e.target, r);
        changed = true;
      }
    }
    if (!changed) break;
  }
  // Workloads with no connections in the window sit with the other local workloads.
  const connected = new Set(graph.edges.flatMap((e) => [e.source, e.target]));
  const localRanks = nodes.filter((n) => n.local && connected.has(n.id)).map((n) => rank.get(n.id));
  const localRank = localRanks.length ? Math.max(...localRanks) : 0;
  for (const n of nodes) if (!connected.has(n.id)) rank.set(n.id, n.local ? localRank : 0);

  const layers = [];
  for (const n of nodes) {
    const r = rank.get(n.id);
    while (layers.length <= r) layers.push([]);
    layers[r].push(n);
  }
  const compact = layers.filter((l) => l.length);
  // Order each layer by where its neighbours in the previous layer sit.
  const position = new Map();
  compact.forEach((layer, li) => {
    if (li > 0) {
      const weight = (n) => {
        const ends = graph.edges.filter((e) => e.target === n.id && position.has(e.source)).map((e) => position.get(e.source));
        return ends.length ? ends.reduce((a, b) => a + b, 0) / ends.length : Infinity;
      };
      layer.sort((a, b) => weight(a) - weight(b) || a.label.localeCompare(b.label));
    }
    layer.forEach((n, i) => position.set(n.id, i));
  });

  const pad = vertical ? 12 : 28;
  const boxes = new Map();
  let height;
  if (!vertical) {
    const cols = compact.length;
    const boxW = Math.max(170, Math.min(230, (width - 2 * pad - (cols - 1) * 290) / Math.max(cols, 1)));
    const boxH = 66;
    const tallest = Math.max(1, ...compact.map((l) => l.length));
    const slot = Math.max(130, Math.min(230, (room - 2 * pad) / tallest));
    height = Math.max(room, tallest * slot + 2 * pad);
    compact.forEach((layer, c) => {
      const x = cols === 1 ? (width - boxW) / 2 : pad + (c * (width - 2 * pad - boxW)) / (cols - 1);
      const top = (height - layer.length * slot) / 2;
      layer.forEach((n, i) => boxes.set(n.id, { x, y: top + i * slot + (slot - boxH) / 2, w: boxW, h: boxH }));
    });
  } else {
    const rowGap = 190;
    const boxH = 62;
    height = compact.length * boxH + (compact.length - 1) * rowGap + 2 * pad;
    compact.forEach((layer, r) => {
      const gap = 10;
      const boxW = Math.min(200, (width - 2 * pad - (layer.length - 1) * gap) / layer.length);
      const total = layer.length * boxW + (layer.length - 1) * gap;
      const left = (width - total) / 2;
      layer.forEach((n, i) => boxes.set(n.id, { x: left + i * (boxW + gap), y: pad + r * (boxH + rowGap), w: boxW, h: boxH }));
    });
  }
  return { vertical, boxes, height };
}

// Where each edge leaves and enters its boxes, spread along the box side.
function ports(graph, boxes, vertical) {
  const out = new Map();
  const inn = new Map();
  const along = (id) => {
    const b = boxes.get(id);
    return vertical ? b.x + b.w / 2 : b.y + b.h / 2;
  };
  for (const n of graph.nodes) {
    const leaving = graph.edges.filter((e) => e.source === n.id);
    const entering = graph.edges.filter((e) => e.target === n.id);
    leaving.sort((a, b) => along(a.target) - along(b.target));
    entering.sort((a, b) => along(a.source) - along(b.source));
    const b = boxes.get(n.id);
    const spread = (list, map) => {
      list.forEach((e, i) => {
        const f = (i + 1) / (list.length + 1);
        map.set(e.id, vertical ? b.x + b.w * (0.2 + 0.6 * f) : b.y + b.h * (0.15 + 0.7 * f));
      });
    };
    spread(leaving, out);
    spread(entering, inn);
  }
  return { out, inn };
}

function render() {
  const graph = state.graph;
  const canvas = document.getElementById("canvas");
  const width = Math.max(300, canvas.clientWidth);
  document.getElementById("node-name").textContent = graph.node;
  document.getElementById("view-note").textContent =
    `This agent's view (${graph.node}): the connections its own workloads made and received. ` +
    `Other nodes' agents see their own.`;
  renderSummary(graph);

  const drawn = document.getElementById("graph");
  // On a wide screen the drawing fills the window below it; on a phone it takes what it needs.
  const room = Math.max(360, window.innerHeight - canvas.getBoundingClientRect().top - 24);
  // A wide screen draws larger, so the names read at a glance.
  const scale = width < PHONE ? 1 : Math.min(1.3, Math.max(1, width / 760));
  const { vertical, boxes, height } = layout(graph, width / scale, room / scale);
  drawn.setAttribute("viewBox", `0 0 ${width / scale} ${height}`);
  drawn.setAttribute("height", height * scale);
  drawn.replaceChildren();
  const defs = svg("defs", {});
  for (const [name, colour] of [["mutual_tls", "#15803d"], ["plaintext", "#d97706"], ["dropped", "#dc2626"]]) {
    const marker = svg("marker", {
      id: `arrow-${name}`, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 11, markerHeight: 11,
      markerUnits: "userSpaceOnUse", orient: "auto-start-reverse",
    });
    marker.append(
      name === "dropped"
        ? svg("path", { d: "M8 0 V10", stroke: colour, "stroke-width": 3 })
        : svg("path", { d: "M0 0 L10 5 L0 10 Z", fill: colour }),
    );
    defs.append(marker);
  }
  drawn.append(defs);
  document.getElementById("empty").hidden = graph.edges.length > 0;

  const edgeLayer = svg("g", { class: "edges" });
  const pillLayer = svg("g", { class: "pills" });
  const nodeLayer = svg("g", { class: "nodes" });
  drawn.append(edgeLayer, nodeLayer, pillLayer);
  const { out, inn } = ports(graph, boxes, vertical);
  const placed = [];
  // Edges between the same two nodes bow apart so their labels do not overlap.
  const pairs = new Map();
  for (const e of graph.edges) {
    const key = [e.source, e.target].sort().join("\u0000");
    if (!pairs.has(key)) pairs.set(key, []);
    pairs.get(key).push(e);
  }
  for (const e of graph.edges) {
    const s = boxes.get(e.source);
    const t = boxes.get(e.target);
    if (!s || !t) continue;
    const group = pairs.get([e.source, e.target].sort().join("\u0000"));
    const k = group.indexOf(e) - (group.length - 1) / 2;
    const bow = k * (vertical ? 84 : 62);
    let curve;
    if (!vertical) {
      const x0 = s.x + s.w;
      const y0 = out.get(e.id);
      const x1 = t.x - (e.outcome === "dropped" ? 10 : 2);
      const y1 = inn.get(e.id);
      const dx = Math.max(40, (x1 - x0) / 2);
      curve = [[x0, y0], [x0 + dx, y0 + bow], [x1 - dx, y1 + bow], [x1, y1]];
    } else {
      const x0 = out.get(e.id);
      const y0 = s.y + s.h;
      const x1 = inn.get(e.id);
      const y1 = t.y - (e.outcome === "dropped" ? 10 : 2);
      const dy = Math.max(40, (y1 - y0) / 2);
      curve = [[x0, y0], [x0 + bow, y0 + dy], [x1 + bow, y1 - dy], [x1, y1]];
    }
    const [p0, p1, p2, p3] = curve;
    const d = `M${p0[0]} ${p0[1]} C${p1[0]} ${p1[1]} ${p2[0]} ${p2[1]} ${p3[0]} ${p3[1]}`;
    const kind = edgeClass(e);
    const selected = state.selected && state.selected.kind === "edge" && state.selected.id === e.id;
    const g = svg("g", {
      class: `edge ${kind}${selected ? " selected" : ""}`,
      "data-edge-id": e.id,
      "data-security": e.security,
      "data-outcome": e.outcome,
      "data-connections": e.connections,
      "data-failed": e.failed,
      tabindex: 0,
      role: "button",
    });
    g.append(
      svg("title", {}, `${displayName(nodeById(e.source))} → ${displayName(nodeById(e.target))}: ${securityText(e)}, ${countText(e)}, ${policyText(e)}`),
      svg("path", { class: "hit", d }),
      svg("path", { class: "line", d, "marker-end": `url(#arrow-${kind})` }),
    );
    edgeLayer.append(g);
    // The label goes in a layer above every line and box, so lines never cross it.
    const label = svg("g", { class: `edge-label ${kind}${selected ? " selected" : ""}`, "data-pill-of": e.id });
    const pill = edgePill(e, vertical);
    const at = placeLabel(curve, pill, placed, [...boxes.values()]);
    pill.node.setAttribute("transform", `translate(${at.x - pill.w / 2} ${at.y})`);
    label.append(pill.node);
    pillLayer.append(label);
    const select = () => choose({ kind: "edge", id: e.id });
    for (const part of [g, label]) {
      part.addEventListener("click", select);
      part.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter" || ev.key === " ") select();
      });
    }
  }
  for (const n of graph.nodes) {
    const b = boxes.get(n.id);
    if (b) nodeLayer.append(nodeBox(n, b));
  }
  renderPanel();
  state.generation += 1;
  document.body.dataset.generation = String(state.generation);
  document.body.dataset.state = "live";
}

function edgePill(e, compact) {
  const pill = svg("g", { class: "pill" });
  const icon = edgeIcon(e);
  const rect = svg("rect", { rx: 9 });
  pill.append(rect, icon);
  const count = svg("text", { class: "count" }, countText(e));
  pill.append(count);
  const parts = [count];
  if (!compact && e.outcome !== "dropped") {
    const moved = svg("text", { class: "bytes" }, ` · ${bytes(e.bytes_sent + e.bytes_received)}`);
    pill.append(moved);
    parts.push(moved);
  }
  if (e.failed > 0) {
    const failed = svg("text", { class: "failed" }, ` · ${e.failed} failed`);
    pill.append(failed);
    parts.push(failed);
  }
  let policy = null;
  if (!compact) {
    policy = svg("text", { class: "policy" }, e.security === "mutual_tls" && e.outcome !== "dropped" ? "mutual TLS" : policyText(e));
    pill.append(policy);
  }
  // Measure, then place: [icon] count · bytes / policy below.
  document.getElementById("graph").append(pill);
  let x = 24;
  for (const part of parts) {
    part.setAttribute("x", x);
    part.setAttribute("y", policy ? -2 : 4.2);
    x += part.getComputedTextLength() + 2;
  }
  let w = x + 8;
  if (policy) {
    fitText(policy, policy.textContent, 210);
    policy.setAttribute("x", 24);
    policy.setAttribute("y", 11.5);
    w = Math.max(w, 24 + policy.getComputedTextLength() + 10);
  }
  const h = policy ? 34 : 24;
  icon.setAttribute("transform", `translate(13 ${policy ? -4 : 0})`);
  rect.setAttribute("x", 0);
  rect.setAttribute("y", -h / 2);
  rect.setAttribute("width", w);
  rect.setAttribute("height", h);
  pill.remove();
  return { node: pill, w, h };
}

function bezier([p0, p1, p2, p3], t) {
  const u = 1 - t;
  const at = (i) => u * u * u * p0[i] + 3 * u * u * t * p1[i] + 3 * u * t * t * p2[i] + t * t * t * p3[i];
  return { x: at(0), y: at(1) };
}

// Where along its curve an edge's label goes: the middle, else the nearest spot where it
// covers no other label and no box.
function placeLabel(curve, pill, placed, boxes) {
  const margin = 5;
  const hits = (r) =>
    placed.some((o) => r.x < o.x + o.w + margin && o.x < r.x + r.w + margin && r.y < o.y + o.h + margin && o.y < r.y + r.h + margin) ||
    boxes.some((b) => r.x < b.x + b.w && b.x < r.x + r.w && r.y < b.y + b.h && b.y < r.y + r.h);
  let best = null;
  for (const t of [0.5, 0.42, 0.58, 0.34, 0.66, 0.27, 0.73, 0.2, 0.8]) {
    const c = bezier(curve, t);
    const r = { x: c.x - pill.w / 2, y: c.y - pill.h / 2, w: pill.w, h: pill.h };
    if (!best) best = { c, r };
    if (!hits(r)) {
      best = { c, r };
      break;
    }
  }
  placed.push(best.r);
  return best.c;
}

function nodeBox(n, b) {
  const selected = state.selected && state.selected.kind === "node" && state.selected.id === n.id;
  const g = svg("g", {
    class: `node ${n.kind}${n.local ? " local" : ""}${selected ? " selected" : ""}`,
    "data-node-id": n.id,
    transform: `translate(${b.x} ${b.y})`,
    tabindex: 0,
    role: "button",
  });
  g.append(
    svg("title", {}, [n.label, n.identity, n.address].filter(Boolean).join("\n")),
    svg("rect", { class: "card", width: b.w, height: b.h, rx: 9 }),
    svg("rect", { class: "accent", x: 0, y: 8, width: 4, height: b.h - 16, rx: 2 }),
  );
  const icon = nodeIcon(n);
  icon.setAttribute("transform", `translate(22 ${b.h / 2})`);
  g.append(icon);
  const room = b.w - 44;
  const lines = [
    ["name", nodeTitle(n), 21],
    ["sub", nodeSubtitle(n), 38],
    ["id", nodeThirdLine(n), 54],
  ];
  document.getElementById("graph").append(g);
  for (const [cls, text, y] of lines) {
    if (!text) continue;
    const t = svg("text", { class: cls, x: 38, y: y * (b.h / 66) });
    g.append(t);
    fitText(t, text, room);
  }
  g.remove();
  const select = () => choose({ kind: "node", id: n.id });
  g.addEventListener("click", select);
  g.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") select();
  });
  return g;
}

function renderSummary(graph) {
  const t = graph.totals;
  const chip = (cls, icon, n, text) =>
    el("span", { class: `chip ${cls}${n === 0 ? " zero" : ""}`, "data-count": n }, icon, el("b", {}, String(n)), text);
  const summary = document.getElementById("summary");
  summary.replaceChildren(
    chip("mtls", iconSvg(lockIcon(true), 18), t.mutual_tls, "mutual TLS"),
    chip("plain", iconSvg(lockIcon(false), 18), t.plaintext, "plaintext"),
    chip("dropped", iconSvg(droppedIcon(), 18), t.dropped, "dropped by policy"),
    chip("failed", null, t.failed, "failed"),
  );
}

function choose(selection) {
  state.selected = selection;
  render();
  // On a phone the details are below the drawing: bring them into view.
  if (selection && window.innerWidth < PHONE) document.getElementById("panel").scrollIntoView({ behavior: "smooth" });
}

function renderPanel() {
  const panel = document.getElementById("panel");
  const graph = state.graph;
  const sel = state.selected;
  if (sel && sel.kind === "edge") {
    const e = graph.edges.find((x) => x.id === sel.id);
    if (e) return panel.replaceChildren(...edgeDetails(e));
  }
  if (sel && sel.kind === "node") {
    const n = nodeById(sel.id);
    if (n) return panel.replaceChildren(...nodeDetails(n));
  }
  state.selected = null;
  const cards = [...graph.edges].sort((a, b) => b.last_unix_ms - a.last_unix_ms).map(edgeCard);
  panel.replaceChildren(
    el("h2", {}, graph.edges.length ? "Connections (click one for details)" : "Connections"),
    ...cards,
    ...(graph.edges.length ? [] : [el("p", { class: "note" }, "Nothing yet in this window.")]),
    legend(),
  );
}

function edgeCard(e) {
  const card = el("button", { class: `edge-card ${edgeClass(e)}`, type: "button", "data-card-of": e.id });
  const what =
    e.outcome === "dropped"
      ? `${countText(e)} · ${portsText(e)}`
      : `${securityText(e)} · ${plural(e.connections, "connection")} · ${bytes(e.bytes_sent)} ↑ ${bytes(e.bytes_received)} ↓ · ${portsText(e)}`;
  card.append(
    iconSvg(edgeIcon(e), 22),
    el("span", { class: "who" }, `${displayName(nodeById(e.source))} → ${displayName(nodeById(e.target))}`),
    el("span", { class: "what" }, what, e.failed ? el("span", { class: "bad" }, ` · ${e.failed} failed`) : null),
    el("span", { class: "why" }, e.security === "mutual_tls" && e.outcome !== "dropped" ? "both identities checked" : policyText(e)),
  );
  card.addEventListener("click", () => choose({ kind: "edge", id: e.id }));
  return card;
}

function portsText(e) {
  return e.ports.length === 1 ? `port ${e.ports[0]}` : `ports ${e.ports.join(", ")}`;
}

function backButton() {
  const back = el("button", { class: "back", type: "button" }, "← all connections");
  back.addEventListener("click", () => choose(null));
  return back;
}

function facts(rows) {
  const dl = el("dl", { class: "facts" });
  for (const [term, value] of rows) {
    if (value === null || value === undefined || value === "") continue;
    dl.append(el("dt", {}, term), el("dd", {}, value));
  }
  return dl;
}

function edgeDetails(e) {
  const source = nodeById(e.source);
  const target = nodeById(e.target);
  const table = el("table", { class: "conns", "data-connections-of": e.id });
  table.append(el("thead", {}, el("tr", {}, el("th", {}, "time"), el("th", {}, "from"), el("th", {}, "outcome"))));
  const body = el("tbody", {});
  for (const r of e.recent) {
    const verdict = r.open ? "open" : r.verdict;
    const why = (r.reason || (r.security === "mutual_tls" ? "mutual TLS" : "")).replace(/^plaintext (allowed|refused): /, "");
    body.append(
      el(
        "tr",
        { "data-record-id": r.id },
        el("td", { class: "nowrap" }, clock(r.start_unix_ms)),
        el("td", { class: "nowrap mono" }, r.source),
        el(
          "td",
          {},
          el("span", { class: `tag ${r.verdict}` }, r.count > 1 ? `${verdict} ×${r.count}` : verdict),
          ` ${bytes(r.bytes_sent)} / ${bytes(r.bytes_received)}`,
          why ? el("div", { class: "why" }, why) : null,
        ),
      ),
    );
  }
  table.append(body);
  return [
    backButton(),
    el("h2", {}, `${displayName(source)} → ${displayName(target)}`),
    facts([
      ["security", e.security === "mutual_tls" ? "mutual TLS" : "plaintext"],
      ["outcome", e.outcome === "dropped" ? "dropped by policy" : e.failed ? "allowed; some failed" : "allowed"],
      ["decided by", e.security === "mutual_tls" && e.outcome !== "dropped" ? "mutual TLS: both identities checked" : e.policies.join("; ")],
      ["connections", `${e.connections}${e.open ? ` (${e.open} open)` : ""}${e.failed ? `, ${e.failed} failed` : ""}`],
      ["bytes", `${bytes(e.bytes_sent)} sent, ${bytes(e.bytes_received)} received`],
      ["caller", [source.identity, source.address].filter(Boolean).join(" · ") || source.label],
      ["destination", `${[target.identity, target.address].filter(Boolean).join(" · ") || target.label} · ${portsText(e)}`],
      ["last", clock(e.last_unix_ms)],
    ]),
    el("h2", {}, `Recent connections (${e.recent.length}${e.recent.length < e.connections ? ` of ${e.connections}` : ""})`),
    table,
  ];
}

function nodeDetails(n) {
  const t = n.totals;
  const labels = el("div", { class: "labels" });
  for (const [key, value] of Object.entries(n.labels || {})) labels.append(el("span", {}, `${key}=${value}`));
  return [
    backButton(),
    el("h2", {}, n.kind === "workload" ? n.label : `${nodeTitle(n)} ${n.label}`),
    facts([
      ["kind", n.kind === "workload" ? (n.local ? "workload on this node" : "meshed workload") : nodeTitle(n)],
      ["identity", n.identity],
      ["address", n.address],
      ["labels", Object.keys(n.labels || {}).length ? labels : null],
      ["since start", t ? `${t.mutual_tls} mutual TLS, ${t.plaintext} plaintext, ${t.dropped} dropped, ${t.failed} failed` : null],
      ["bytes", t ? `${bytes(t.bytes_sent)} in from callers, ${bytes(t.bytes_received)} back` : null],
    ]),
    el("h2", {}, "Its connections"),
    ...state.graph.edges.filter((e) => e.source === n.id || e.target === n.id).map(edgeCard),
  ];
}

function legend() {
  const row = (icon, cls, text) => {
    const box = svg("svg", { viewBox: "0 0 34 16", "aria-hidden": "true", class: cls });
    icon.setAttribute("transform", "translate(17 8) scale(0.7)");
    box.append(svg("path", { d: "M2 8 H32", class: "line" }), icon);
    return el("div", {}, box, text);
  };
  return el(
    "div",
    { class: "legend" },
    row(lockIcon(true), "mutual_tls", "mutual TLS: both ends proved their identity"),
    row(lockIcon(false), "plaintext", "plaintext: a caller outside the mesh, allowed by PERMISSIVE"),
    row(droppedIcon(), "dropped", "dropped: refused by STRICT"),
  );
}

async function poll() {
  const windowSecs = document.getElementById("window").value;
  const live = document.getElementById("live");
  try {
    const response = await fetch(`/graph.json?window=${encodeURIComponent(windowSecs)}`, { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const text = await response.text();
    const graph = JSON.parse(text);
    live.dataset.ok = "true";
    document.getElementById("updated").textContent = `live · ${clock(graph.generated_unix_ms)}`;
    // Only redraw when something changed (generated_unix_ms always does).
    const body = text.replace(/"generated_unix_ms":\d+,/, "");
    if (body !== state.text) {
      state.text = body;
      state.graph = graph;
      render();
    }
  } catch (err) {
    live.dataset.ok = "false";
    document.getElementById("updated").textContent = `agent unreachable (${err.message}); retrying`;
  }
}

function start() {
  document.getElementById("window").addEventListener("change", () => {
    state.text = "";
    poll();
  });
  // Redraw when the drawing's width changes (window resized, phone turned); its height
  // follows the drawing, so only the width is watched.
  const canvas = document.getElementById("canvas");
  let width = canvas.clientWidth;
  let resizing = null;
  new ResizeObserver(() => {
    if (canvas.clientWidth === width) return;
    width = canvas.clientWidth;
    clearTimeout(resizing);
    resizing = setTimeout(() => state.graph && render(), 60);
  }).observe(canvas);
  poll();
  setInterval(poll, POLL_MS);
}

start();
