// curate view: the little interactivity the pages need. Data reaches the page only through textContent
// (never innerHTML), so text from datasets cannot become markup.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, text, cls) => {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
};
const SVG = "http://www.w3.org/2000/svg";
const svgEl = (tag, attrs) => {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
};
const readJSON = (id) => JSON.parse($(id).textContent);

// ---- teacher logits ---------------------------------------------------------------------------------
function logits() {
  const row = readJSON("logit-data");
  const box = $("tokens");
  const hs = row.tokens.map((t) => t.entropy);
  const minH = Math.min(...hs), span = Math.max(...hs) - minH || 1;
  row.tokens.forEach((t, i) => {
    const span = el("span", t.text === "" ? "∅" : t.text, "tok");
    span.tabIndex = 0;
    span.dataset.index = i;
    const shade = (t.entropy - minH) / span;  // relative to this row's range
    span.style.backgroundColor = `rgba(220, 90, 40, ${(0.08 + 0.8 * shade).toFixed(3)})`;
    span.title = `entropy ${t.entropy.toFixed(3)} nats`;
    const show = () => {
      document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
      span.classList.add("selected");
      $("token-detail").hidden = false;
      $("tok-text").textContent = JSON.stringify(t.text);
      $("tok-id").textContent = t.id;
      $("tok-entropy").textContent = t.entropy.toFixed(4);
      $("tok-residual").textContent = t.residual.toPrecision(4);
      const body = $("topk").querySelector("tbody");
      body.replaceChildren();
      t.topk.forEach((c, j) => {
        const tr = el("tr", null, c.id === t.id ? "target" : "");
        tr.append(el("td", j + 1), el("td", c.id), el("td", JSON.stringify(c.text)), el("td", c.prob.toFixed(5)));
        body.append(tr);
      });
    };
    span.addEventListener("click", show);
    span.addEventListener("keydown", (e) => { if (e.key === "Enter") show(); });
    box.append(span);
  });
}

// ---- SaGE similarity graph ----------------------------------------------------------------------------
function sageGraph() {
  const q = readJSON("sage-data");
  const n = q.nodes.length, W = 420, H = 320, R = 120;
  const svg = svgEl("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, id: "graph-svg" });
  const pos = q.nodes.map((_, i) => [W / 2 + R * Math.cos((2 * Math.PI * i) / n - Math.PI / 2),
                                     H / 2 + R * Math.sin((2 * Math.PI * i) / n - Math.PI / 2)]);
  const edgeLayer = svgEl("g");
  svg.append(edgeLayer);
  q.nodes.forEach((node, i) => {
    const g = svgEl("g", { class: "node" });
    const c = svgEl("circle", { cx: pos[i][0], cy: pos[i][1], r: 16 });
    const label = svgEl("text", { x: pos[i][0], y: pos[i][1] + 5, "text-anchor": "middle" });
    label.textContent = String(node.i);
    const tip = svgEl("title");
    tip.textContent = `${node.paraphrased || ""}\n— ${node.rot || ""}`;
    g.append(c, label, tip);
    svg.append(g);
  });
  $("graph").append(svg);
  const slider = $("edge-threshold");
  const draw = () => {
    const thr = parseFloat(slider.value);
    $("edge-threshold-value").textContent = thr.toFixed(2);
    edgeLayer.replaceChildren();
    q.edges.filter((e) => e.w >= thr).forEach((e) => {
      const [a, b] = [pos[e.a], pos[e.b]];
      const line = svgEl("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: "edge",
                                   "stroke-width": (1 + 5 * Math.max(0, e.w)).toFixed(2) });
      const tip = svgEl("title");
      tip.textContent = `${e.a}–${e.b}: ${e.w}`;
      line.append(tip);
      edgeLayer.append(line);
    });
  };
  slider.addEventListener("input", draw);
  draw();
}

// ---- lineage graph --------------------------------------------------------------------------------------
function lineageGraph() {
  const g = readJSON("lineage-data");
  if (!g.nodes.length) return;
  const depth = {};
  const parents = {};
  g.edges.forEach((e) => { if (e.from) (parents[e.to] = parents[e.to] || []).push(e.from); });
  const d = (id, seen) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    const ps = parents[id] || [];
    return (depth[id] = ps.length ? 1 + Math.max(...ps.map((p) => d(p, seen))) : 0);
  };
  g.nodes.forEach((n) => d(n.id, new Set()));
  const cols = {};
  g.nodes.forEach((n) => (cols[depth[n.id]] = cols[depth[n.id]] || []).push(n));
  const boxW = Math.max(160, ...g.nodes.map((n) => 7 * (n.ref.length + (n.builder || "?").length + 4)));
  const colW = boxW + 70, rowH = 34;
  const maxRows = Math.max(...Object.values(cols).map((c) => c.length));
  const svg = svgEl("svg", { width: colW * Object.keys(cols).length + 20, height: rowH * maxRows + 20, id: "lineage-svg" });
  const pos = {};
  Object.entries(cols).forEach(([c, nodes]) => nodes.forEach((n, r) => (pos[n.id] = [10 + c * colW, 14 + r * rowH])));
  g.edges.filter((e) => e.from && pos[e.from]).forEach((e) => {
    const [a, b] = [pos[e.from], pos[e.to]];
    svg.append(svgEl("line", { x1: a[0] + boxW, y1: a[1] + 10, x2: b[0], y2: b[1] + 10, class: "edge" }));
  });
  g.nodes.forEach((n) => {
    const [x, y] = pos[n.id];
    const a = svgEl("a", { href: `/d/${encodeURIComponent(n.name)}/${encodeURIComponent(n.tag)}` });
    a.append(svgEl("rect", { x, y, width: boxW, height: 22, rx: 4, class: "box" }));
    const t = svgEl("text", { x: x + 6, y: y + 15 });
    t.textContent = `${n.ref} (${n.builder || "?"})`;
    a.append(t);
    svg.append(a);
  });
  $("lineage").append(svg);
}

// ---- annotation --------------------------------------------------------------------------------------
function annotator() {
  const root = $("annotate");
  const task = root.dataset.task;
  let who = root.dataset.annotator;
  let state = null, pos = 0, fieldIdx = 0;
  const api = (path) => `/api/annotate/${encodeURIComponent(task)}/${path}`;
  const status = (text, bad) => { $("status").textContent = text; $("status").className = bad ? "status error" : "status"; };

  async function load() {
    const r = await fetch(api(`state?annotator=${encodeURIComponent(who)}`));
    const body = await r.json();
    if (!r.ok) { status(body.error || r.statusText, true); return; }
    state = body;
    $("login").hidden = true;
    $("work").hidden = false;
    $("who").textContent = who;
    pos = state.next === null ? 0 : state.next;
    render();
  }
  function render() {
    const it = state.items[pos];
    const pair = state.kind === "pair";
    $("label-a").textContent = pair ? "Answer A" : `Statement (${it.split || ""})`;
    $("ctx-a").textContent = pair ? (it.question_a || "") : "";
    $("text-a").textContent = pair ? it.text_a : it.statement;
    $("label-b").textContent = pair ? "Answer B" : `${it.gold !== undefined ? "Model's label" : "Label"}: ${it.label}`;
    $("ctx-b").textContent = pair ? (it.question_b || "") : "";
    $("text-b").textContent = pair ? it.text_b : (it.reason || "(no reason)");
    $("position").textContent = `${pos + 1} / ${state.items.length}`;
    $("progress").textContent = `${state.done} of ${state.items.length} done`;
    $("done-note").hidden = state.next !== null;
    fieldIdx = state.fields.findIndex((f) => !state.judgments[`${it.id}|${f}`]);
    if (fieldIdx < 0) fieldIdx = 0;
    document.querySelectorAll("#fields .field").forEach((div, i) => {
      const v = state.judgments[`${it.id}|${div.dataset.field}`] || "";
      div.querySelector(".answer").textContent = v ? `saved: ${v}` : "";
      div.querySelectorAll("button").forEach((b) => b.classList.toggle("chosen", b.dataset.value === v));
      div.classList.toggle("active", i === fieldIdx);
    });
  }
  async function judge(field, value) {
    const it = state.items[pos];
    const r = await fetch(api("judge"), { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ item: it.id, annotator: who, field, value }) });
    const body = await r.json();
    if (!r.ok) { status(body.error || r.statusText, true); return; }
    state.judgments[`${it.id}|${field}`] = value;
    state.done = body.done;
    state.next = body.next;
    status(`saved ${it.id}: ${field} = ${value}`);
    const rest = state.fields.findIndex((f) => !state.judgments[`${it.id}|${f}`]);
    if (rest < 0 && pos + 1 < state.items.length) pos += 1;
    render();
  }
  document.querySelectorAll("#fields .field").forEach((div) =>
    div.querySelectorAll("button").forEach((b) => b.addEventListener("click", () => judge(div.dataset.field, b.dataset.value))));
  $("prev-item").addEventListener("click", () => { if (pos > 0) { pos -= 1; render(); } });
  $("next-item").addEventListener("click", () => { if (pos + 1 < state.items.length) { pos += 1; render(); } });
  $("export").addEventListener("click", async () => {
    const r = await fetch(api("export"), { method: "POST" });
    const body = await r.json();
    status(r.ok ? `exported ${body.ref}` : body.error, !r.ok);
  });
  document.addEventListener("keydown", (e) => {
    if (!state || e.target.tagName === "INPUT") return;
    const value = { y: "Y", n: "N", a: "NA" }[e.key.toLowerCase()];
    if (value) { e.preventDefault(); judge(state.fields[fieldIdx], value); }
    else if (e.key === "ArrowLeft") $("prev-item").click();
    else if (e.key === "ArrowRight") $("next-item").click();
  });
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    who = $("annotator-name").value.trim();
    if (who) { history.replaceState(null, "", `?annotator=${encodeURIComponent(who)}`); load(); }
  });
  if (who) load();
}

if ($("logit-data")) logits();
if ($("sage-data")) sageGraph();
if ($("lineage-data")) lineageGraph();
if ($("annotate")) annotator();
const whoBox = $("annotator");
if (whoBox) {
  whoBox.value = localStorage.getItem("curate-annotator") || "";
  document.querySelectorAll(".task-link").forEach((a) => a.addEventListener("click", (e) => {
    const name = whoBox.value.trim();
    if (name) { localStorage.setItem("curate-annotator", name); a.href += `?annotator=${encodeURIComponent(name)}`; }
  }));
}
