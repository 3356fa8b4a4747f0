// A service as a graph: a layered layout (cycles broken, longest-path layers, dummy nodes
// on long edges, barycentre ordering) drawn as SVG, left to right.

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 140;
const NODE_H = 40;
const COL_GAP = 120;
const ROW_GAP = 26;
const PAD = 20;

/// The edges of the drawing: one per source of each transition (a merge has several).
export function drawnEdges(edges) {
  const out = [];
  for (const e of edges) {
    e.from.forEach((from, i) => out.push({ ...e, from, part: i, label: edgeLabel(e) }));
  }
  return out;
}

export function edgeLabel(e) {
  if (e.type === "if" && e.expression) return `if ${e.expression}`;
  return e.type;
}

/// Positions of `nodes` (names) joined by `edges` ({from, to}): `{pos: Map name → {x, y,
/// layer}, paths: [[{x, y}...] per edge], width, height}`.
export function layout(names, edges) {
  const index = new Map(names.map((n, i) => [n, i]));
  const valid = edges.filter((e) => index.has(e.from) && index.has(e.to));
  // 1. Break cycles: edges that close a cycle in a depth-first walk are drawn reversed.
  const out = new Map(names.map((n) => [n, []]));
  valid.forEach((e, i) => out.get(e.from).push({ to: e.to, i }));
  const state = new Map();
  const reversed = new Set();
  const visit = (root) => {
    const stack = [[root, 0]];
    state.set(root, 1);
    while (stack.length) {
      const top = stack[stack.length - 1];
      const [n, k] = top;
      const next = out.get(n)[k];
      if (!next) {
        state.set(n, 2);
        stack.pop();
        continue;
      }
      top[1] += 1;
      const s = state.get(next.to);
      if (s === 1) reversed.add(next.i);
      else if (!s) {
        state.set(next.to, 1);
        stack.push([next.to, 0]);
      }
    }
  };
  names.forEach((n) => state.get(n) || visit(n));
  const dag = valid.map((e, i) => (reversed.has(i) || e.from === e.to ? { from: e.to, to: e.from, i } : { from: e.from, to: e.to, i }));

  // 2. Longest-path layers: a node sits one layer after its furthest predecessor.
  const preds = new Map(names.map((n) => [n, []]));
  dag.forEach((e) => e.from !== e.to && preds.get(e.to).push(e.from));
  const layer = new Map();
  const layerOf = (n, seen = new Set()) => {
    if (layer.has(n)) return layer.get(n);
    if (seen.has(n)) return 0;
    seen.add(n);
    let l = 0;
    for (const p of preds.get(n)) l = Math.max(l, layerOf(p, seen) + 1);
    layer.set(n, l);
    return l;
  };
  names.forEach((n) => layerOf(n));

  // 3. Long edges get a dummy node in every layer they cross.
  const layers = [];
  const put = (id, l) => {
    while (layers.length <= l) layers.push([]);
    layers[l].push(id);
  };
  names.forEach((n) => put(n, layer.get(n)));
  const chains = []; // per drawn edge: the ids it passes through
  const adj = new Map(names.map((n) => [n, { up: [], down: [] }]));
  const link = (a, b) => {
    adj.get(a).down.push(b);
    adj.get(b).up.push(a);
  };
  dag.forEach((e) => {
    const chain = [e.from];
    if (e.from !== e.to) {
      let prev = e.from;
      for (let l = layer.get(e.from) + 1; l < layer.get(e.to); l++) {
        const id = `\u0000${e.i}:${l}`;
        adj.set(id, { up: [], down: [] });
        layer.set(id, l);
        put(id, l);
        link(prev, id);
        chain.push(id);
        prev = id;
      }
      link(prev, e.to);
    }
    chain.push(e.to);
    chains[e.i] = reversed.has(e.i) ? chain.slice().reverse() : chain;
  });

  // 4. Barycentre ordering: sweep down and up, ordering each layer by the mean position
  // of its neighbours in the layer before; ties keep the previous order.
  const order = new Map();
  layers.forEach((ids) => ids.forEach((id, i) => order.set(id, i)));
  const sweep = (ids, neighbours) => {
    const bary = new Map(
      ids.map((id) => {
        const ns = neighbours(id);
        return [id, ns.length ? ns.reduce((s, n) => s + order.get(n), 0) / ns.length : order.get(id)];
      }),
    );
    ids.sort((a, b) => bary.get(a) - bary.get(b) || order.get(a) - order.get(b));
    ids.forEach((id, i) => order.set(id, i));
  };
  // Edge crossings between consecutive layers, to keep the best ordering seen.
  const crossings = () => {
    let total = 0;
    for (let l = 0; l + 1 < layers.length; l++) {
      const pairs = [];
      for (const id of layers[l]) for (const d of adj.get(id).down) pairs.push([order.get(id), order.get(d)]);
      for (let i = 0; i < pairs.length; i++)
        for (let j = i + 1; j < pairs.length; j++) if ((pairs[i][0] - pairs[j][0]) * (pairs[i][1] - pairs[j][1]) < 0) total++;
    }
    return total;
  };
  let best = layers.map((ids) => ids.slice());
  let fewest = crossings();
  for (let round = 0; round < 12 && fewest > 0; round++) {
    if (round % 2 === 0) for (let l = 1; l < layers.length; l++) sweep(layers[l], (id) => adj.get(id).up);
    else for (let l = layers.length - 2; l >= 0; l--) sweep(layers[l], (id) => adj.get(id).down);
    const now = crossings();
    if (now < fewest) {
      fewest = now;
      best = layers.map((ids) => ids.slice());
    }
  }
  best.forEach((ids, l) => {
    layers[l] = ids;
    ids.forEach((id, i) => order.set(id, i));
  });

  // 5. Coordinates: layers are columns. Each node moves towards the mean height of its
  // neighbours in the column before (then after), keeping its layer's order and spacing.
  const STEP = NODE_H + ROW_GAP;
  const tallest = Math.max(1, ...layers.map((ids) => ids.length));
  const y = new Map();
  layers.forEach((ids) => {
    const top = ((tallest - ids.length) * STEP) / 2;
    ids.forEach((id, i) => y.set(id, top + i * STEP));
  });
  const settle = (ids, neighbours) => {
    const want = ids.map((id) => {
      const ns = neighbours(id);
      return ns.length ? ns.reduce((sum, n) => sum + y.get(n), 0) / ns.length : y.get(id);
    });
    const pos = want.slice();
    for (let i = 1; i < pos.length; i++) pos[i] = Math.max(pos[i], pos[i - 1] + STEP);
    // Pushed down too far: share the shift with the nodes above.
    for (let i = pos.length - 2; i >= 0; i--) pos[i] = Math.min(pos[i], pos[i + 1] - STEP, Math.max(want[i], pos[i]));
    const drift = pos.reduce((sum, v, i) => sum + (v - want[i]), 0) / Math.max(1, pos.length);
    ids.forEach((id, i) => y.set(id, pos[i] - drift / 2));
    for (let i = 1; i < ids.length; i++) y.set(ids[i], Math.max(y.get(ids[i]), y.get(ids[i - 1]) + STEP));
  };
  for (let round = 0; round < 4; round++) {
    for (let l = 1; l < layers.length; l++) settle(layers[l], (id) => adj.get(id).up);
    for (let l = layers.length - 2; l >= 0; l--) settle(layers[l], (id) => adj.get(id).down);
  }
  const minY = Math.min(...[...y.values()]);
  const maxY = Math.max(...[...y.values()]);
  const height = PAD * 2 + (maxY - minY) + NODE_H;
  const pos = new Map();
  layers.forEach((ids, l) => ids.forEach((id) => pos.set(id, { x: PAD + l * (NODE_W + COL_GAP), y: PAD + y.get(id) - minY, layer: l })));
  const width = PAD * 2 + Math.max(1, layers.length) * NODE_W + Math.max(0, layers.length - 1) * COL_GAP;
  const paths = valid.map((e, i) => {
    const chain = chains[i];
    if (e.from === e.to) {
      const p = pos.get(e.from);
      return [
        { x: p.x + NODE_W * 0.7, y: p.y },
        { x: p.x + NODE_W * 0.7, y: p.y - 18 },
        { x: p.x + NODE_W * 0.3, y: p.y - 18 },
        { x: p.x + NODE_W * 0.3, y: p.y },
      ];
    }
    return chain.map((id, k) => {
      const p = pos.get(id);
      const real = !id.startsWith("\u0000");
      if (!real) return { x: p.x + NODE_W / 2, y: p.y + NODE_H / 2 };
      const leaving = k === 0;
      const forward = layer.get(chain[0]) <= layer.get(chain[chain.length - 1]);
      const right = leaving === forward;
      return { x: p.x + (right ? NODE_W : 0), y: p.y + NODE_H / 2 };
    });
  });
  const real = new Map(names.map((n) => [n, pos.get(n)]));
  return { pos: real, paths, width, height };
}

function el(name, attrs = {}, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}

function pathData(points) {
  if (points.length === 4 && points[0].y === points[3].y && points[1].y < points[0].y) {
    const [a, b, c, d] = points;
    return `M${a.x},${a.y} C${b.x},${b.y} ${c.x},${c.y} ${d.x},${d.y}`;
  }
  let d = `M${points[0].x},${points[0].y}`;
  for (let i = 1; i < points.length; i++) {
    const a = points[i - 1];
    const b = points[i];
    const mx = (a.x + b.x) / 2;
    d += ` C${mx},${a.y} ${mx},${b.y} ${b.x},${b.y}`;
  }
  return d;
}

const short = (s, n) => (s.length > n ? s.slice(0, n - 1) + "…" : s);

/// Draws `graph` ({nodes: [{name, kind}], edges}) into `container`. `onSelect(name)` on a
/// click or Enter on a node. Returns `{svg, setStatus(name, status)}`.
export function renderGraph(container, graph, onSelect) {
  const names = graph.nodes.map((n) => n.name);
  const edges = drawnEdges(graph.edges);
  const { pos, paths, width, height } = layout(names, edges);
  const svg = el("svg", {
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "group",
    "aria-label": `graph of ${graph.project}: ${names.length} nodes, ${edges.length} edges`,
    class: "graph",
  });
  const defs = el("defs");
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.appendChild(el("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" }));
  defs.appendChild(marker);
  svg.appendChild(defs);
  const edgeLayer = el("g", { class: "edges" });
  const labelLayer = el("g", { class: "edge-labels" });
  edges.forEach((e, i) => {
    const pts = paths[i];
    const g = el("g", { class: `edge edge-${e.type}`, "data-from": e.from, "data-to": e.to, "data-type": e.type });
    g.appendChild(el("path", { d: pathData(pts), "marker-end": "url(#arrow)" }));
    const title = el("title", {}, `${e.from} → ${e.to}: ${e.label}`);
    g.appendChild(title);
    edgeLayer.appendChild(g);
    if (e.type !== "then") {
      // The label sits on the middle of the edge's path.
      const mid = pts[Math.floor((pts.length - 1) / 2)];
      const nxt = pts[Math.min(pts.length - 1, Math.floor((pts.length - 1) / 2) + 1)];
      const x = (mid.x + nxt.x) / 2;
      const y = (mid.y + nxt.y) / 2 - 5;
      const t = el("text", { x, y, class: `edge-label label-${e.type}`, "text-anchor": "middle", "data-label": e.label }, short(e.label, 22));
      t.appendChild(el("title", {}, e.label));
      labelLayer.appendChild(t);
    }
  });
  svg.appendChild(edgeLayer);
  const nodeLayer = el("g", { class: "nodes" });
  const nodeEls = new Map();
  for (const n of graph.nodes) {
    const p = pos.get(n.name);
    const g = el("g", {
      class: `node kind-${n.kind}`,
      transform: `translate(${p.x},${p.y})`,
      tabindex: 0,
      role: "button",
      "data-name": n.name,
      "data-kind": n.kind,
      "aria-label": `${n.kind} ${n.name}`,
    });
    const shape = n.kind === "block" ? el("rect", { width: NODE_W, height: NODE_H, rx: 6 }) : el("rect", { width: NODE_W, height: NODE_H, rx: NODE_H / 2 });
    g.appendChild(shape);
    g.appendChild(el("text", { x: 10, y: 16, class: "node-kind" }, n.kind === "block" ? (n.settings && n.settings.language) || "block" : n.kind));
    g.appendChild(el("text", { x: 10, y: 32, class: "node-name" }, short(n.name, 20)));
    g.appendChild(el("title", {}, `${n.kind} ${n.name}`));
    const status = el("circle", { cx: NODE_W - 12, cy: 12, r: 5, class: "status-dot" });
    g.appendChild(status);
    g.addEventListener("click", () => onSelect(n.name));
    g.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        onSelect(n.name);
      }
    });
    nodeLayer.appendChild(g);
    nodeEls.set(n.name, g);
  }
  svg.appendChild(nodeLayer);
  svg.appendChild(labelLayer);
  container.replaceChildren(svg);
  // Shrunk to fit the container when that keeps it readable; scrolled otherwise.
  const fit = () => {
    const room = container.clientWidth - 2;
    const scale = room > 0 ? Math.min(1, Math.max(0.75, room / width)) : 1;
    svg.setAttribute("width", Math.round(width * scale));
    svg.setAttribute("height", Math.round(height * scale));
  };
  fit();
  return {
    svg,
    select(name) {
      nodeEls.forEach((g, n) => g.classList.toggle("selected", n === name));
    },
    setStatus(name, status) {
      const g = nodeEls.get(name);
      if (!g) return;
      for (const c of [...g.classList]) if (c.startsWith("st-")) g.classList.remove(c);
      if (status) g.classList.add(`st-${status}`);
      g.setAttribute("data-status", status || "");
    },
  };
}
