// The Refinery console: a hash-routed page over the REST API (`api.js`), the service graph
// (`graph.js`). No framework; the DOM is built with `h()` (text is always set as text, never
// parsed as HTML).

import { api, ApiError, Stale, currentKey, setKey, sessionId, newNavigation, enc } from "./api.js";
import { renderGraph } from "./graph.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signout = document.getElementById("signout");
const flashEl = document.getElementById("flash");

let me = null; // {operator: bool, name}
let poller = null;

// ---------- DOM helpers ----------

function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return e;
}

const badge = (s) => h("span", { class: `badge ${s || ""}` }, s || "—");
const fmtTime = (t) => (t ? new Date(t).toLocaleString() : "—");
const fmtMs = (ms) => (ms == null ? "—" : ms < 1000 ? `${Number(ms).toFixed(1)} ms` : `${(ms / 1000).toFixed(2)} s`);
const json = (v) => (v === undefined ? "" : JSON.stringify(v, null, 2));
const pre = (text, cls) => h("pre", { class: cls, tabindex: 0 }, text == null || text === "" ? "(empty)" : String(text));
const empty = (text) => h("div", { class: "empty" }, text);

function table(headers, rows, emptyText) {
  if (!rows.length) return empty(emptyText);
  return h(
    "div",
    { class: "table-wrap" },
    h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))), h("tbody", {}, rows)),
  );
}

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(Boolean).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v == null ? "—" : typeof v === "object" && !(v instanceof Node) ? JSON.stringify(v) : v)]));
}

let keepFlash = false;
/// A message above the page: an error, or (`info`) a confirmation that survives the next
/// page change (a rollback re-renders the page it confirms).
function flash(message, info) {
  keepFlash = Boolean(info && message);
  flashEl.textContent = message;
  flashEl.className = info ? "info" : "";
  flashEl.hidden = !message;
}

function errorBox(e) {
  return h("div", { class: "error-box", role: "alert" }, e instanceof ApiError ? e.explain() : String(e.message || e));
}

function page(title, ...children) {
  document.title = `${title} · Refinery`;
  main.replaceChildren(h("h1", {}, title), ...children.flat().filter(Boolean));
}

// A tiny highlighter for read-only code: comments, strings, numbers, keywords.
const KEYWORDS = new Set("def return if elif else for while in import from as class try except finally raise with lambda None True False and or not pass yield async await function const let var new this null undefined true false throw catch typeof export default echo fi then do done case esac".split(" "));
function highlight(code) {
  const out = h("pre", { class: "code", tabindex: 0 });
  const re = /(#[^\n]*|\/\/[^\n]*)|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)|(\b\d+(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)/g;
  let last = 0;
  for (const m of code.matchAll(re)) {
    if (m.index > last) out.appendChild(document.createTextNode(code.slice(last, m.index)));
    const [text, com, str, num, word] = m;
    const cls = com ? "com" : str ? "str" : num ? "num" : word && KEYWORDS.has(word) ? "kw" : null;
    out.appendChild(cls ? h("span", { class: cls }, text) : document.createTextNode(text));
    last = m.index + text.length;
  }
  out.appendChild(document.createTextNode(code.slice(last)));
  return out;
}

// ---------- session ----------

async function identify() {
  // The operator key can list accounts; an account key is refused with 403; a wrong key 401.
  try {
    await api.get("/v1/accounts");
    return { operator: true, name: "operator" };
  } catch (e) {
    if (e instanceof ApiError && e.status === 403 && e.code !== "account_disabled") {
      const usage = await api.get("/v1/usage");
      return { operator: false, name: usage.account || "account" };
    }
    throw e;
  }
}

function clearState() {
  me = null;
  stopPolling();
  main.replaceChildren();
  who.textContent = "";
  nav.hidden = true;
  signout.hidden = true;
  flash("");
}

function signOut() {
  setKey(null);
  clearState();
  location.hash = "#/";
  route();
}

signout.addEventListener("click", signOut);

function signInPage(error) {
  clearState();
  document.title = "Sign in · Refinery";
  const input = h("input", { id: "key", type: "password", autocomplete: "off", spellcheck: "false", required: true, placeholder: "rk_..." });
  const form = h(
    "form",
    { class: "card signin", id: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an account key (from `refinery accounts create`) or the operator key (the server's operator.key). It is kept in this browser tab only, until you sign out or close the tab."),
    h("label", { for: "key" }, "API key"),
    input,
    error ? errorBox(error) : null,
    h("p", {}, h("button", { type: "submit" }, "Sign in")),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setKey(key);
    try {
      me = await identify();
    } catch (e) {
      if (e instanceof Stale) return;
      setKey(null);
      signInPage(e);
      return;
    }
    location.hash = "#/";
    route();
  });
  main.replaceChildren(form);
  input.focus();
}

function showChrome() {
  nav.hidden = false;
  signout.hidden = false;
  who.textContent = me.operator ? "signed in as the operator" : `account ${me.name}`;
  for (const a of nav.querySelectorAll("[data-operator]")) a.hidden = !me.operator;
  for (const a of nav.querySelectorAll("[data-nav='projects']")) a.hidden = me.operator;
  for (const a of nav.querySelectorAll("[data-nav='usage']")) a.hidden = false;
}

function stopPolling() {
  if (poller) clearTimeout(poller);
  poller = null;
}

// ---------- router ----------

const routes = [
  [/^\/$/, () => (me.operator ? operatorAccounts() : projectsPage())],
  [/^\/p\/([^/]+)$/, (p) => projectPage(p, "graph")],
  [/^\/p\/([^/]+)\/(graph|runs|executions|deployments|run)$/, (p, tab) => projectPage(p, tab)],
  [/^\/run\/([^/]+)$/, (id) => runPage(id)],
  [/^\/execution\/([^/]+)$/, (id) => executionPage(id)],
  [/^\/usage$/, () => usagePage()],
  [/^\/bills$/, () => billsPage()],
  [/^\/operator\/accounts$/, () => operatorAccounts()],
  [/^\/operator\/instances$/, () => instancesPage()],
  [/^\/operator\/audit$/, () => auditPage()],
  [/^\/operator\/pricing$/, () => pricingPage()],
];

async function route() {
  newNavigation();
  stopPolling();
  if (keepFlash) keepFlash = false;
  else flash("");
  if (!currentKey()) return signInPage();
  if (!me) {
    try {
      me = await identify();
    } catch (e) {
      if (e instanceof Stale) return;
      setKey(null);
      return signInPage(e);
    }
  }
  showChrome();
  const path = (location.hash.replace(/^#/, "") || "/").split("?")[0];
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.getAttribute("href") === `#${path}`);
  for (const [re, view] of routes) {
    const m = path.match(re);
    if (m) {
      const mine = sessionId();
      try {
        await view(...m.slice(1).map(decodeURIComponent));
      } catch (e) {
        if (e instanceof Stale || mine !== sessionId()) return;
        page("Something went wrong", errorBox(e));
      }
      main.focus({ preventScroll: true });
      return;
    }
  }
  page("Not found", empty(`There is no console page at ${path}.`), h("p", {}, h("a", { href: "#/" }, "Back to the start")));
}

window.addEventListener("hashchange", route);
window.addEventListener("storage", () => {
  // Another tab cannot share sessionStorage, but guard anyway: a changed key clears state.
  if (!currentKey()) signOut();
});

// ---------- projects ----------

async function projectsPage() {
  const { projects } = await api.get("/v1/projects");
  const hourAgo = Date.now() - 3600_000;
  const rows = await Promise.all(
    projects.map(async (p) => {
      const [runs, execs] = await Promise.all([
        api.get(`/v1/projects/${enc(p.project)}/runs?limit=1`).catch(() => ({ runs: [] })),
        api.get(`/v1/projects/${enc(p.project)}/executions?limit=500`).catch(() => ({ executions: [] })),
      ]);
      const last = runs.runs[0];
      const errors = execs.executions.filter((x) => x.status !== "ok" && Date.parse(x.started_at) >= hourAgo).length;
      return h(
        "tr",
        { "data-project": p.project },
        h("td", {}, h("a", { href: `#/p/${enc(p.project)}` }, p.project)),
        h("td", { class: "num" }, p.live_deployment == null ? "—" : String(p.live_deployment)),
        h("td", {}, last ? [badge(last.status), " ", h("a", { href: `#/run/${enc(last.run_id)}` }, fmtTime(last.started_at))] : h("span", { class: "muted" }, "no runs yet")),
        h("td", { class: "num errors-last-hour" }, String(errors)),
      );
    }),
  );
  page(
    "Projects",
    table(["Project", "Live deployment", "Last run", "Errors (last hour)"], rows, "No projects yet. Deploy one with `refinery deploy` in a directory with a refinery.toml."),
  );
}

// ---------- a project ----------

function projectTabs(p, tab) {
  const tabs = [
    ["graph", "Graph"],
    ["run", "Run"],
    ["runs", "Runs"],
    ["executions", "Executions"],
    ["deployments", "Deployments"],
  ];
  return h("nav", { class: "tabs", "aria-label": "project" }, tabs.map(([t, label]) => h("a", { href: `#/p/${enc(p)}/${t}`, class: t === tab ? "active" : null, "aria-current": t === tab ? "page" : null }, label)));
}

async function projectPage(p, tab) {
  const views = { graph: graphTab, run: runTab, runs: runsTab, executions: executionsTab, deployments: deploymentsTab };
  const body = h("div", {});
  page(`Project ${p}`, projectTabs(p, tab), body);
  await views[tab](p, body);
}

function legend() {
  return h("div", { class: "legend", "aria-hidden": "true" }, h("span", {}, "then"), h("span", { class: "l-if" }, "if / else"), h("span", { class: "l-fan" }, "fan-out / fan-in"), h("span", { class: "l-merge" }, "merge"), h("span", { class: "l-exc" }, "exception"));
}

async function graphTab(p, body, deployment) {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const number = deployment || q.get("deployment");
  const graph = await api.get(`/v1/projects/${enc(p)}/graph${number ? `?deployment=${enc(number)}` : ""}`);
  const panel = h("aside", { class: "card panel", id: "node-panel", "aria-live": "polite" }, h("p", { class: "muted" }, "Select a node (click, or Tab to it and press Enter) to see its settings, code, environment and recent executions."));
  const wrap = h("div", { class: "graph-wrap", id: "graph" });
  body.append(
    h("p", { class: "muted" }, `Deployment ${graph.deployment}${graph.live ? " (live)" : ""} · ${graph.nodes.length} nodes · ${graph.edges.length} transitions`),
    legend(),
    h("div", { class: "split" }, wrap, panel),
  );
  if (!graph.nodes.length) {
    wrap.replaceChildren(empty("This deployment has no nodes."));
    return;
  }
  const drawn = renderGraph(wrap, graph, (name) => {
    drawn.select(name);
    nodePanel(p, graph, name, panel);
  });
}

async function nodePanel(p, graph, name, panel) {
  const node = graph.nodes.find((n) => n.name === name);
  const incoming = graph.edges.filter((e) => e.to === name);
  const outgoing = graph.edges.filter((e) => e.from.includes(name));
  const edgeText = (e, other) => `${other} (${e.type}${e.expression ? `: ${e.expression}` : ""})`;
  const parts = [
    h("h2", {}, `${node.kind} ${name}`),
    kv(Object.entries(node.settings || {}).map(([k, v]) => [k, v == null ? "default" : typeof v === "object" ? JSON.stringify(v) : String(v)])),
    h("h3", {}, "Transitions"),
    incoming.length || outgoing.length
      ? h("ul", {}, incoming.map((e) => h("li", {}, "from ", edgeText(e, e.from.join(", ")))), outgoing.map((e) => h("li", {}, "to ", edgeText(e, e.to))))
      : h("p", { class: "muted" }, "none"),
  ];
  if (node.kind === "block") {
    const env = Object.keys(node.env || {});
    parts.push(
      h("h3", {}, "Environment"),
      env.length ? kv(env.map((k) => [k, h("span", { class: "masked", title: "values are never shown: they may be secrets" }, node.env[k])])) : h("p", { class: "muted" }, "no environment variables"),
      h("h3", {}, `Code (${node.source_name}, read-only)`),
      highlight(node.code || ""),
      h("h3", {}, "Live instances"),
    );
    const instances = h("div", {}, h("p", { class: "muted" }, "loading…"));
    const recent = h("div", {}, h("p", { class: "muted" }, "loading…"));
    parts.push(instances, h("h3", {}, "Recent executions"), recent);
    panel.replaceChildren(...parts);
    try {
      const [{ executions }, live] = await Promise.all([api.get(`/v1/projects/${enc(p)}/executions?block=${enc(name)}&limit=10`), api.get("/v1/instances")]);
      recent.replaceChildren(executionsTable(executions, "No executions of this block yet."));
      const mine = (live.instances || []).filter((i) => i.project === p && i.block === name);
      instances.replaceChildren(
        table(
          ["Instance", "State", "Deployment", "Invocations", "Last used"],
          mine.map((i) => h("tr", {}, h("td", {}, h("code", {}, i.id)), h("td", {}, badge(i.state)), h("td", { class: "num" }, String(i.deployment)), h("td", { class: "num" }, String(i.invocations)), h("td", {}, fmtTime(i.last_used_at)))),
          "No live instances: the next invocation starts one (a cold start).",
        ),
      );
    } catch (e) {
      if (!(e instanceof Stale)) recent.replaceChildren(errorBox(e));
    }
  } else {
    panel.replaceChildren(...parts);
  }
}

function executionsTable(executions, emptyText) {
  return table(
    ["Execution", "Block", "Status", "Started", "Duration", "Cold"],
    executions.map((x) =>
      h(
        "tr",
        {},
        h("td", {}, h("a", { href: `#/execution/${enc(x.execution_id)}` }, x.execution_id.slice(0, 14))),
        h("td", {}, x.block),
        h("td", {}, badge(x.status)),
        h("td", {}, fmtTime(x.started_at)),
        h("td", { class: "num" }, fmtMs(x.duration_ms)),
        h("td", {}, x.cold ? "cold" : "warm"),
      ),
    ),
    emptyText,
  );
}

function parseJsonField(textarea, errorEl, what) {
  const text = textarea.value.trim();
  if (!text) return { ok: true, value: null };
  try {
    const value = JSON.parse(text);
    errorEl.textContent = "";
    textarea.removeAttribute("aria-invalid");
    return { ok: true, value };
  } catch (e) {
    errorEl.textContent = `The ${what} is not valid JSON: ${e.message}. Fix it before sending (strings need double quotes, e.g. {"name": "Ada"}).`;
    textarea.setAttribute("aria-invalid", "true");
    textarea.focus();
    return { ok: false };
  }
}

async function runTab(p, body) {
  const graph = await api.get(`/v1/projects/${enc(p)}/graph`);
  const blocks = graph.nodes.filter((n) => n.kind === "block").map((n) => n.name);
  if (!blocks.length) {
    body.append(empty("This project has no blocks to run."));
    return;
  }
  const select = h("select", { id: "start" }, blocks.map((b) => h("option", { value: b }, b)));
  const input = h("textarea", { id: "input", "aria-describedby": "input-error" }, "{}");
  const backpack = h("textarea", { id: "backpack", "aria-describedby": "backpack-error" }, "");
  const inputError = h("div", { class: "field-error", id: "input-error", role: "alert" });
  const backpackError = h("div", { class: "field-error", id: "backpack-error", role: "alert" });
  const result = h("div", { id: "run-result" });
  const read = () => {
    const i = parseJsonField(input, inputError, "input");
    if (!i.ok) return null;
    const b = parseJsonField(backpack, backpackError, "backpack");
    if (!b.ok) return null;
    if (b.value != null && (typeof b.value !== "object" || Array.isArray(b.value))) {
      backpackError.textContent = "The backpack must be a JSON object, e.g. {\"user\": \"ada\"}.";
      return null;
    }
    return { input: i.value, backpack: b.value };
  };
  const startRun = async () => {
    const v = read();
    if (!v) return;
    const req = { start: select.value, input: v.input };
    if (v.backpack) req.backpack = v.backpack;
    try {
      const started = await api.post(`/v1/projects/${enc(p)}/runs`, req);
      location.hash = `#/run/${enc(started.run_id)}`;
    } catch (e) {
      if (!(e instanceof Stale)) result.replaceChildren(errorBox(e));
    }
  };
  const invoke = async () => {
    const v = read();
    if (!v) return;
    result.replaceChildren(h("p", { class: "muted" }, "running…"));
    try {
      const x = await api.post(`/v1/projects/${enc(p)}/blocks/${enc(select.value)}/invoke`, v.input);
      result.replaceChildren(executionDetail(x));
    } catch (e) {
      if (!(e instanceof Stale)) result.replaceChildren(errorBox(e));
    }
  };
  const graphNote = graph.edges.length ? "Start a run: the service follows its transitions from this block, and the run page shows each step light up." : "This project has no transitions: a run is one step.";
  body.append(
    h(
      "form",
      { class: "card", id: "run-form", onsubmit: (ev) => (ev.preventDefault(), startRun()) },
      h("p", { class: "muted" }, graphNote),
      h("label", { for: "start" }, "Block"),
      select,
      h("label", { for: "input" }, "Input (JSON)"),
      input,
      inputError,
      h("label", { for: "backpack" }, "Backpack (JSON object, optional; runs only)"),
      backpack,
      backpackError,
      h("div", { class: "row" }, h("button", { type: "submit", id: "start-run" }, "Start run"), h("button", { type: "button", class: "secondary", id: "invoke", onclick: invoke }, "Invoke block only")),
    ),
    result,
  );
}

async function runsTab(p, body) {
  const { runs } = await api.get(`/v1/projects/${enc(p)}/runs?limit=200`);
  const statusSel = h("select", { id: "filter-run-status" }, ["", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s }, s || "any status")));
  const startSel = h("select", { id: "filter-run-start" }, h("option", { value: "" }, "any start"), [...new Set(runs.map((r) => r.start))].map((s) => h("option", { value: s }, s)));
  const since = sinceSelect("filter-run-since");
  const list = h("div", {});
  const show = () => {
    const from = Date.now() - Number(since.value);
    const shown = runs.filter((r) => (!statusSel.value || r.status === statusSel.value) && (!startSel.value || r.start === startSel.value) && (!Number(since.value) || Date.parse(r.started_at) >= from));
    list.replaceChildren(
      table(
        ["Run", "Start", "Status", "Started", "Steps", "Deployment"],
        shown.map((r) => h("tr", {}, h("td", {}, h("a", { href: `#/run/${enc(r.run_id)}` }, r.run_id.slice(0, 16))), h("td", {}, r.start), h("td", {}, badge(r.status)), h("td", {}, fmtTime(r.started_at)), h("td", { class: "num" }, String(r.steps)), h("td", { class: "num" }, String(r.deployment)))),
        runs.length ? "No runs match." : "No runs yet: start one from the Run tab.",
      ),
    );
  };
  for (const s of [statusSel, startSel, since]) s.addEventListener("change", show);
  body.append(h("div", { class: "row card" }, h("div", {}, h("label", { for: statusSel.id }, "Status"), statusSel), h("div", {}, h("label", { for: startSel.id }, "Start"), startSel), h("div", {}, h("label", { for: since.id }, "Started"), since)), list);
  show();
}

function sinceSelect(id) {
  const choices = [
    [0, "any time"],
    [3600_000, "in the last hour"],
    [86400_000, "in the last day"],
    [7 * 86400_000, "in the last week"],
  ];
  return h("select", { id }, choices.map(([ms, label]) => h("option", { value: String(ms) }, label)));
}

async function executionsTab(p, body) {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const graph = await api.get(`/v1/projects/${enc(p)}/graph`).catch(() => ({ nodes: [] }));
  const blockSel = h("select", { id: "filter-block" }, h("option", { value: "" }, "all blocks"), graph.nodes.filter((n) => n.kind === "block").map((n) => h("option", { value: n.name, selected: q.get("block") === n.name }, n.name)));
  const statusSel = h("select", { id: "filter-status" }, ["", "ok", "error", "init_error", "timeout", "oom", "crashed"].map((s) => h("option", { value: s, selected: q.get("status") === s }, s || "any status")));
  const since = sinceSelect("filter-since");
  const list = h("div", {});
  const load = async () => {
    const { executions } = await api.get(`/v1/projects/${enc(p)}/executions?limit=500${blockSel.value ? `&block=${enc(blockSel.value)}` : ""}`);
    const from = Date.now() - Number(since.value);
    const shown = executions.filter((x) => (!statusSel.value || x.status === statusSel.value) && (!Number(since.value) || Date.parse(x.started_at) >= from));
    list.replaceChildren(executionsTable(shown, executions.length ? "No executions match." : "No executions yet."));
  };
  for (const s of [blockSel, statusSel, since]) s.addEventListener("change", () => load().catch((e) => e instanceof Stale || list.replaceChildren(errorBox(e))));
  body.append(h("div", { class: "row card" }, h("div", {}, h("label", { for: "filter-block" }, "Block"), blockSel), h("div", {}, h("label", { for: "filter-status" }, "Status"), statusSel), h("div", {}, h("label", { for: since.id }, "Started"), since)), list);
  await load();
}

async function deploymentsTab(p, body) {
  const { deployments } = await api.get(`/v1/projects/${enc(p)}/deployments`);
  const status = h("div", { role: "status" });
  const rows = deployments
    .slice()
    .reverse()
    .map((d) =>
      h(
        "tr",
        {},
        h("td", { class: "num" }, String(d.deployment)),
        h("td", {}, fmtTime(d.created_at)),
        h("td", {}, d.live ? badge("live") : ""),
        h("td", {}, d.blocks.join(", ")),
        h(
          "td",
          {},
          h("a", { href: `#/p/${enc(p)}/graph?deployment=${d.deployment}` }, "graph"),
          " ",
          d.live
            ? null
            : h(
                "button",
                {
                  type: "button",
                  class: "secondary",
                  "data-rollback": String(d.deployment),
                  onclick: async () => {
                    if (!confirm(`Make deployment ${d.deployment} of ${p} live?`)) return;
                    try {
                      await api.post(`/v1/projects/${enc(p)}/rollback`, { deployment: d.deployment });
                      flash(`Deployment ${d.deployment} is live.`, true);
                      route();
                    } catch (e) {
                      if (!(e instanceof Stale)) status.replaceChildren(errorBox(e));
                    }
                  },
                },
                "Roll back to this",
              ),
        ),
      ),
    );
  body.append(status, table(["Deployment", "Created", "", "Blocks", ""], rows, "No deployments."));
  if (deployments.length >= 2) body.append(compareForm(p, deployments));
}

// ---------- comparing two deployments ----------

/// Line diff (longest common subsequence): [["=", line] | ["-", line] | ["+", line]].
function lineDiff(a, b) {
  const x = a.split("\n");
  const y = b.split("\n");
  if (x.length * y.length > 4_000_000) return [["-", a], ["+", b]];
  const L = Array.from({ length: x.length + 1 }, () => new Uint32Array(y.length + 1));
  for (let i = x.length - 1; i >= 0; i--) for (let j = y.length - 1; j >= 0; j--) L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  let i = 0;
  let j = 0;
  while (i < x.length && j < y.length) {
    if (x[i] === y[j]) (out.push(["=", x[i]]), i++, j++);
    else if (L[i + 1][j] >= L[i][j + 1]) out.push(["-", x[i++]]);
    else out.push(["+", y[j++]]);
  }
  while (i < x.length) out.push(["-", x[i++]]);
  while (j < y.length) out.push(["+", y[j++]]);
  return out;
}

function diffGraphs(a, b) {
  const changes = [];
  const nodesA = new Map(a.nodes.map((n) => [n.name, n]));
  const nodesB = new Map(b.nodes.map((n) => [n.name, n]));
  for (const [name, n] of nodesB) if (!nodesA.has(name)) changes.push(h("li", { class: "added" }, `+ ${n.kind} ${name} added`));
  for (const [name, n] of nodesA) if (!nodesB.has(name)) changes.push(h("li", { class: "removed" }, `− ${n.kind} ${name} removed`));
  for (const [name, nb] of nodesB) {
    const na = nodesA.get(name);
    if (!na) continue;
    const sa = na.settings || {};
    const sb = nb.settings || {};
    for (const k of new Set([...Object.keys(sa), ...Object.keys(sb)])) {
      if (JSON.stringify(sa[k]) !== JSON.stringify(sb[k])) changes.push(h("li", {}, `${name}: ${k} ${JSON.stringify(sa[k] ?? null)} → ${JSON.stringify(sb[k] ?? null)}`));
    }
    const ea = Object.keys(na.env || {}).sort().join(", ");
    const eb = Object.keys(nb.env || {}).sort().join(", ");
    if (ea !== eb) changes.push(h("li", {}, `${name}: environment names ${ea || "(none)"} → ${eb || "(none)"}`));
    if ((na.code || "") !== (nb.code || "")) {
      const d = lineDiff(na.code || "", nb.code || "");
      const view = h("pre", { class: "diff", tabindex: 0 }, d.filter(([op]) => op !== "=").map(([op, line]) => h("span", { class: op === "+" ? "add" : "del" }, `${op === "+" ? "+" : "-"} ${line}\n`)));
      changes.push(h("li", {}, `${name}: code changed`, view));
    }
  }
  const key = (e) => `${e.from.join(" + ")} → ${e.to} (${e.type}${e.expression ? `: ${e.expression}` : ""})`;
  const edgesA = new Set(a.edges.map(key));
  const edgesB = new Set(b.edges.map(key));
  for (const e of edgesB) if (!edgesA.has(e)) changes.push(h("li", { class: "added" }, `+ transition ${e}`));
  for (const e of edgesA) if (!edgesB.has(e)) changes.push(h("li", { class: "removed" }, `− transition ${e}`));
  return changes;
}

function compareForm(p, deployments) {
  const numbers = deployments.map((d) => d.deployment);
  const pick = (id, selected) => h("select", { id }, numbers.map((n) => h("option", { value: n, selected: n === selected }, `deployment ${n}`)));
  const from = pick("diff-from", numbers[numbers.length - 2]);
  const to = pick("diff-to", numbers[numbers.length - 1]);
  const out = h("div", { id: "diff", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card" },
    h("h2", {}, "Compare two deployments"),
    h("div", { class: "row" }, h("div", {}, h("label", { for: "diff-from" }, "From"), from), h("div", {}, h("label", { for: "diff-to" }, "To"), to), h("button", { type: "submit" }, "Compare")),
    out,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const [a, b] = await Promise.all([from.value, to.value].map((n) => api.get(`/v1/projects/${enc(p)}/graph?deployment=${enc(n)}`)));
      const changes = diffGraphs(a, b);
      out.replaceChildren(changes.length ? h("ul", { class: "changes" }, changes) : empty(`Deployments ${from.value} and ${to.value} have the same blocks, settings, code and transitions.`));
    } catch (e) {
      if (!(e instanceof Stale)) out.replaceChildren(errorBox(e));
    }
  });
  return form;
}

// ---------- runs ----------

function stepTree(run, onPick) {
  const children = new Map();
  const roots = [];
  for (const s of run.steps) {
    if (!s.parents.length) roots.push(s);
    else {
      const parent = s.parents[0];
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(s);
    }
  }
  const byId = new Set(run.steps.map((s) => s.step_id));
  for (const s of run.steps) if (s.parents.length && !byId.has(s.parents[0])) roots.push(s);
  const item = (s) =>
    h(
      "li",
      {},
      h("button", { type: "button", class: "step-link", "data-step": s.name, onclick: () => onPick(s) }, s.name),
      " ",
      badge(s.status),
      s.item != null ? h("span", { class: "muted" }, ` item ${s.item}`) : null,
      s.attempt > 1 ? h("span", { class: "muted" }, ` attempt ${s.attempt}`) : null,
      h("span", { class: "muted" }, ` ${s.transition} · ${fmtMs(s.duration_ms)}`),
      children.has(s.step_id) ? h("ul", {}, children.get(s.step_id).map(item)) : null,
    );
  return h("ul", { class: "steps", id: "step-tree" }, roots.map(item));
}

async function stepDetail(step, box) {
  const parts = [
    h("h2", {}, `Step ${step.name}`),
    kv([
      ["status", badge(step.status)],
      ["attempt", String(step.attempt)],
      ["transition", step.transition],
      ["started", fmtTime(step.started_at)],
      ["duration", fmtMs(step.duration_ms)],
      step.item != null ? ["item", String(step.item)] : null,
      ["execution", step.execution_id ? h("a", { href: `#/execution/${enc(step.execution_id)}` }, step.execution_id) : "—"],
    ]),
    h("h3", {}, "Input"),
    pre(json(step.input)),
    h("h3", {}, "Output"),
    pre(json(step.output)),
    step.error ? [h("h3", {}, "Error"), errorDetail(step.error)] : null,
    h("h3", {}, "Backpack"),
    pre(json(step.backpack)),
  ];
  const logs = h("div", { id: "step-logs" });
  box.replaceChildren(...parts.flat().filter(Boolean), h("h3", {}, "Logs"), logs);
  if (!step.execution_id) {
    logs.replaceChildren(h("p", { class: "muted" }, "This step has no execution (yet)."));
    return;
  }
  try {
    const x = await executionSoon(step.execution_id);
    box.querySelector("dl").append(h("dt", {}, "start"), h("dd", {}, x.cold ? "cold" : "warm"));
    logs.replaceChildren(pre(x.logs, "logs"));
  } catch (e) {
    if (!(e instanceof Stale)) logs.replaceChildren(errorBox(e));
  }
}

/// An execution that may not be recorded yet: a step's result is committed with the run,
/// its execution record a moment later (the store's writer batches them).
async function executionSoon(id) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await api.get(`/v1/executions/${enc(id)}`);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404) || attempt >= 20) throw e;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
}

function errorDetail(error) {
  if (typeof error !== "object" || !error) return pre(String(error));
  return h("div", {}, h("p", {}, h("strong", {}, error.type || "error"), ": ", error.message || ""), error.traceback ? pre(error.traceback, "traceback") : null, Object.keys(error).some((k) => !["type", "message", "traceback"].includes(k)) ? pre(json(error)) : null);
}

async function runPage(id) {
  let run = await api.get(`/v1/runs/${enc(id)}`);
  const graph = await api.get(`/v1/projects/${enc(run.project)}/graph?deployment=${run.deployment}`).catch(() => null);
  const summary = h("div", { id: "run-summary" });
  const wrap = h("div", { class: "graph-wrap", id: "graph" });
  const tree = h("div", { class: "card" });
  const detail = h("aside", { class: "card panel", id: "step-panel" }, h("p", { class: "muted" }, "Select a step (in the tree, or a node of the graph) for its input, output, logs and timing."));
  page(`Run ${id.slice(0, 16)}`, h("p", {}, h("a", { href: `#/p/${enc(run.project)}/runs` }, `← runs of ${run.project}`)), summary, legend(), h("div", { class: "split" }, h("div", {}, wrap, h("h2", {}, "Steps"), tree), detail));
  let drawn = null;
  if (graph && graph.nodes.length) {
    drawn = renderGraph(wrap, graph, (name) => {
      const steps = run.steps.filter((s) => s.name === name);
      if (steps.length) stepDetail(steps[steps.length - 1], detail);
    });
  } else wrap.replaceChildren(empty("The deployment of this run is gone: no graph."));
  const pick = (s) => stepDetail(s, detail);
  const paint = () => {
    summary.replaceChildren(
      kv([
        ["project", h("a", { href: `#/p/${enc(run.project)}` }, run.project)],
        ["deployment", String(run.deployment)],
        ["start", run.start],
        [
          "status",
          h(
            "span",
            { id: "run-status", "data-status": run.status },
            badge(run.status),
            run.status === "running"
              ? [
                  " ",
                  h(
                    "button",
                    {
                      type: "button",
                      class: "danger",
                      id: "cancel-run",
                      onclick: async () => {
                        try {
                          await api.post(`/v1/runs/${enc(id)}/cancel`);
                          flash("Cancelling: pending steps are cancelled, running ones finish, nothing new starts.", true);
                        } catch (e) {
                          if (!(e instanceof Stale)) summary.append(errorBox(e));
                        }
                      },
                    },
                    "Cancel run",
                  ),
                ]
              : null,
          ),
        ],
        ["started", fmtTime(run.started_at)],
        ["duration", fmtMs(run.duration_ms)],
        run.error ? ["error", errorDetail(run.error)] : null,
        run.response ? ["response", pre(json(run.response))] : null,
      ]),
    );
    if (drawn) {
      const latest = new Map();
      for (const s of run.steps) latest.set(s.name, s.status);
      graph.nodes.forEach((n) => drawn.setStatus(n.name, latest.get(n.name)));
    }
    tree.replaceChildren(run.steps.length ? stepTree(run, pick) : empty("No steps yet."));
  };
  paint();
  const mine = sessionId();
  const poll = async () => {
    if (run.status !== "running" || mine !== sessionId()) return;
    poller = setTimeout(async () => {
      try {
        run = await api.get(`/v1/runs/${enc(id)}`);
        if (mine !== sessionId() || !location.hash.startsWith(`#/run/${enc(id)}`)) return;
        paint();
        poll();
      } catch (e) {
        if (!(e instanceof Stale)) summary.append(errorBox(e));
      }
    }, 500);
  };
  poll();
}

// ---------- executions ----------

function executionDetail(x) {
  return h(
    "div",
    { class: "card", id: "execution" },
    kv([
      ["execution", x.execution_id],
      ["project", x.project],
      ["block", x.block],
      ["status", badge(x.status)],
      ["deployment", String(x.deployment)],
      ["started", fmtTime(x.started_at)],
      ["duration", fmtMs(x.duration_ms)],
      ["init", fmtMs(x.init_ms)],
      ["start", x.cold ? "cold" : "warm"],
      ["instance", x.instance_id],
    ]),
    x.error ? [h("h3", {}, "Error"), errorDetail(x.error)] : null,
    h("h3", {}, "Input"),
    pre(json(x.input)),
    h("h3", {}, "Output"),
    pre(json(x.output)),
    x.backpack !== undefined ? [h("h3", {}, "Backpack"), pre(json(x.backpack))] : null,
    h("h3", {}, "Logs"),
    pre(x.logs, "logs"),
  );
}

async function executionPage(id) {
  const x = await api.get(`/v1/executions/${enc(id)}`);
  page(`Execution ${id.slice(0, 16)}`, h("p", {}, h("a", { href: `#/p/${enc(x.project)}/executions` }, `← executions of ${x.project}`)), executionDetail(x));
}

// ---------- usage and bills ----------

function usageBlock(u) {
  const max = Math.max(1, ...u.blocks.map((b) => b.requests));
  return h(
    "div",
    { class: "usage", "data-account": u.account },
    h("h2", {}, `${u.account} · ${u.period}`),
    kv([
      ["requests", String(u.totals.requests)],
      ["GB-seconds", String(u.totals.gb_seconds)],
      ["init GB-seconds", String(u.totals.init_gb_seconds)],
      ["egress bytes", String(u.totals.egress_bytes)],
      u.cost ? ["cost so far", `${u.cost.total} ${u.currency || ""}`] : null,
    ]),
    dayChart(u.days),
    table(
      ["Project", "Block", "Requests", "", "GB-s", "Init GB-s", "Egress bytes"],
      u.blocks.map((b) =>
        h(
          "tr",
          { "data-block": `${b.project}/${b.block}` },
          h("td", {}, b.project),
          h("td", {}, b.block),
          h("td", { class: "num requests" }, String(b.requests)),
          h("td", { "aria-hidden": "true" }, h("span", { class: "bar", style: null, "data-w": Math.round((b.requests / max) * 100) })),
          h("td", { class: "num" }, String(b.gb_seconds)),
          h("td", { class: "num" }, String(b.init_gb_seconds)),
          h("td", { class: "num" }, String(b.egress_bytes)),
        ),
      ),
      "No usage this month yet.",
    ),
  );
}

// Requests per day of the month, as SVG bars (a title per bar gives the figures).
function dayChart(days) {
  const NS = "http://www.w3.org/2000/svg";
  const el = (name, attrs) => {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    return e;
  };
  if (!days || !days.length) return h("p", { class: "empty" }, "No usage per day yet.");
  const max = Math.max(1, ...days.map((d) => d.requests));
  const W = 24, H = 120, gap = 4;
  const svg = el("svg", {
    class: "usage-chart",
    role: "img",
    "aria-label": "requests per day",
    viewBox: `0 0 ${days.length * (W + gap)} ${H + 18}`,
    width: days.length * (W + gap),
    height: H + 18,
  });
  days.forEach((d, i) => {
    const bh = Math.max(2, Math.round((d.requests / max) * H));
    const bar = el("rect", { x: i * (W + gap), y: H - bh, width: W, height: bh, class: "day", "data-day": d.day });
    const title = el("title", {});
    title.textContent = `${d.day}: ${d.requests} requests, ${d.gb_seconds} GB-s`;
    bar.appendChild(title);
    svg.appendChild(bar);
    const label = el("text", { x: i * (W + gap) + W / 2, y: H + 14, "text-anchor": "middle", class: "day-label" });
    label.textContent = d.day.slice(8);
    svg.appendChild(label);
  });
  return h("figure", { class: "chart" }, h("figcaption", {}, "Requests per day (UTC)"), svg);
}

function sizeBars(root) {
  // Widths set through the CSSOM (allowed by the CSP), not inline style attributes.
  for (const bar of root.querySelectorAll(".bar[data-w]")) bar.style.width = `${Math.max(2, Number(bar.dataset.w))}px`;
}

async function usagePage() {
  const usage = await api.get("/v1/usage");
  const list = usage.usage ? usage.usage : [usage];
  const body = h("div", {}, list.length ? list.map(usageBlock) : empty("No accounts yet."));
  page("Usage this month", body);
  sizeBars(body);
}

async function downloadCsv(month, account) {
  const q = new URLSearchParams({ format: "csv" });
  if (account) q.set("account", account);
  const response = await api.raw(`/v1/bills/${enc(month)}?${q}`);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: `refinery-bill-${month}${account ? "-" + account : ""}.csv` });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 5000);
}

async function billsPage() {
  const { bills } = await api.get("/v1/bills");
  const status = h("div", { role: "status" });
  const cards = bills.map((b) =>
    h(
      "div",
      { class: "card bill" },
      h("h2", {}, `${b.account} · ${b.period} `, badge(b.status)),
      kv([
        ["closed", fmtTime(b.closed_at)],
        ["total", `${b.bill.total} ${b.bill.currency}`],
      ]),
      kv([
        ["subtotal", `${b.bill.subtotal} ${b.bill.currency}`],
        ["markup", `${b.bill.markup} (${b.bill.markup_percent} %)`],
        ["minimum fee adjustment", String(b.bill.minimum_fee_adjustment)],
      ]),
      table(
        ["Item", "Quantity", "Free", "Billable", "Unit price", "Amount"],
        b.bill.lines.map((l) => h("tr", {}, h("td", {}, l.item), h("td", { class: "num" }, `${l.quantity} ${l.unit}`), h("td", { class: "num" }, String(l.free)), h("td", { class: "num" }, String(l.billable)), h("td", { class: "num" }, `${l.unit_price} / ${l.unit}`), h("td", { class: "num" }, String(l.amount)))),
        "No lines.",
      ),
      h(
        "button",
        {
          type: "button",
          class: "secondary",
          onclick: () => downloadCsv(b.period, me.operator ? b.account : null).catch((e) => e instanceof Stale || status.replaceChildren(errorBox(e))),
        },
        "Download CSV",
      ),
    ),
  );
  page("Bills", status, cards.length ? cards : empty("No closed bills yet: a month's bill is closed after the month ends."));
}

// ---------- operator ----------

const QUOTA_FIELDS = ["instances", "memory_mb", "rate", "burst", "storage_mb"];

async function quotaEditor(account, box) {
  const q = await api.get(`/v1/accounts/${enc(account.name)}/quota`);
  const own = q.overrides || {};
  const effective = q.quota || {};
  const defaults = q.defaults || {};
  // The account's own settings; an empty field is the server's default (shown greyed).
  const inputs = QUOTA_FIELDS.map((f) => [f, h("input", { id: `quota-${f}`, name: f, inputmode: "decimal", value: own[f] != null ? String(own[f]) : "", placeholder: `default ${defaults[f] ?? ""}`, "aria-describedby": `quota-${f}-now` })]);
  const err = h("div", { class: "field-error", role: "alert" });
  const form = h(
    "form",
    { class: "card", id: "quota-form" },
    h("h3", {}, `Quota of ${account.name}`),
    h("p", { class: "muted" }, "Leave a field empty for the server's default."),
    h("div", { class: "row" }, inputs.map(([f, i]) => h("div", {}, h("label", { for: i.id }, f), i, h("div", { class: "muted", id: `quota-${f}-now` }, `in force: ${effective[f] ?? "—"}`)))),
    err,
    h("p", {}, h("button", { type: "submit" }, "Save quota")),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {};
    for (const [f, i] of inputs) {
      const v = i.value.trim();
      if (v === "") body[f] = null;
      else if (!/^\d+(\.\d+)?$/.test(v)) {
        err.textContent = `${f} must be a number (or empty for the server's default); "${v}" is not.`;
        i.focus();
        return;
      } else body[f] = Number(v);
    }
    try {
      await api.put(`/v1/accounts/${enc(account.name)}/quota`, body);
      flash(`Quota of ${account.name} saved.`, true);
      await quotaEditor(account, box);
    } catch (e) {
      if (!(e instanceof Stale)) err.replaceChildren(errorBox(e));
    }
  });
  box.replaceChildren(form, h("details", {}, h("summary", {}, "The quota as the server reports it"), pre(json(q))));
}

const BILLING_FIELDS = ["markup_percent", "minimum_fee", "spending_cap"];

async function billingEditor(account, box) {
  const t = await api.get(`/v1/accounts/${enc(account.name)}/billing`);
  const own = t.overrides || {};
  const defaults = t.defaults || {};
  const inputs = BILLING_FIELDS.map((f) => [f, h("input", { id: `billing-${f}`, name: f, inputmode: "decimal", value: own[f] != null ? String(own[f]) : "", placeholder: f === "spending_cap" ? "no cap" : `default ${defaults[f] ?? ""}` })]);
  const err = h("div", { class: "field-error", role: "alert" });
  const form = h(
    "form",
    { class: "card", id: "billing-form" },
    h("h3", {}, `Billing terms of ${account.name} (${t.currency})`),
    h("p", { class: "muted" }, "Leave a field empty for the default (no spending cap)."),
    h("div", { class: "row" }, inputs.map(([f, i]) => h("div", {}, h("label", { for: i.id }, f), i))),
    t.spending ? kv([["spent this month", `${t.spending.spent} of ${t.spending.cap ?? "no cap"}${t.spending.reached ? " — cap reached: invocations get 402" : ""}`]]) : null,
    err,
    h("p", {}, h("button", { type: "submit" }, "Save billing terms")),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {};
    for (const [f, i] of inputs) {
      const v = i.value.trim();
      if (v === "") body[f] = null;
      else if (!/^\d+(\.\d+)?$/.test(v)) {
        err.textContent = `${f} must be a decimal number like 12.50 (or empty); "${v}" is not.`;
        i.focus();
        return;
      } else body[f] = v;
    }
    try {
      await api.put(`/v1/accounts/${enc(account.name)}/billing`, body);
      flash(`Billing terms of ${account.name} saved.`, true);
      await billingEditor(account, box);
    } catch (e) {
      if (!(e instanceof Stale)) err.replaceChildren(errorBox(e));
    }
  });
  box.replaceChildren(form);
}

async function operatorAccounts() {
  if (!me.operator) return page("Accounts", empty("Only the operator manages accounts."));
  const { accounts } = await api.get("/v1/accounts");
  const editor = h("div", { id: "quota-editor" });
  const created = h("div", { role: "status" });
  const nameInput = h("input", { id: "new-account", required: true, pattern: "[a-z0-9][a-z0-9-]*", placeholder: "name (lowercase, digits, -)" });
  const createForm = h("form", { class: "card row", id: "create-account" }, h("div", {}, h("label", { for: "new-account" }, "New account"), nameInput), h("button", { type: "submit" }, "Create account"));
  createForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const a = await api.post("/v1/accounts", { name: nameInput.value.trim() });
      flash(`Account ${a.name} created.`, true);
      await operatorAccounts();
      document.querySelector("#created-key-box").replaceChildren(h("div", { class: "card" }, h("p", {}, `The key of ${a.name}, shown once: give it to the account's owner.`), h("div", { class: "secret", id: "created-key" }, a.api_key)));
    } catch (e) {
      if (!(e instanceof Stale)) created.replaceChildren(errorBox(e));
    }
  });
  const action = (a, verb) => async () => {
    if (verb === "disable" && !confirm(`Disable ${a.name}? Every request with its key will be refused.`)) return;
    try {
      await api.post(`/v1/accounts/${enc(a.name)}/${verb}`);
      flash(`Account ${a.name} ${verb}d.`, true);
      await operatorAccounts();
    } catch (e) {
      if (!(e instanceof Stale)) created.replaceChildren(errorBox(e));
    }
  };
  const rows = accounts.map((a) =>
    h(
      "tr",
      { "data-account": a.name },
      h("td", {}, a.name),
      h("td", {}, h("code", {}, a.id)),
      h("td", {}, badge(a.state)),
      h("td", {}, fmtTime(a.created_at)),
      h(
        "td",
        {},
        h("button", { type: "button", class: "secondary", "data-action": "quota", onclick: () => quotaEditor(a, editor).catch((e) => e instanceof Stale || editor.replaceChildren(errorBox(e))) }, "Quota"),
        " ",
        h("button", { type: "button", class: "secondary", "data-action": "billing", onclick: () => billingEditor(a, editor).catch((e) => e instanceof Stale || editor.replaceChildren(errorBox(e))) }, "Billing"),
        " ",
        a.state === "disabled" ? h("button", { type: "button", class: "secondary", onclick: action(a, "enable") }, "Enable") : h("button", { type: "button", class: "danger", onclick: action(a, "disable") }, "Disable"),
      ),
    ),
  );
  page("Accounts", createForm, created, h("div", { id: "created-key-box" }), table(["Name", "Id", "State", "Created", ""], rows, "No accounts yet: create one above."), editor);
}

async function instancesPage() {
  const data = await api.get("/v1/instances");
  const list = data.instances || [];
  if (me.operator) {
    const { accounts } = await api.get("/v1/accounts");
    const names = new Map(accounts.map((a) => [a.id, a.name]));
    for (const i of list) i.account = names.get(i.account_id) || i.account_id;
  }
  const cols = me.operator ? ["account", "project", "block", "deployment", "state", "invocations", "last_used_at", "pid", "id"] : ["project", "block", "deployment", "state", "invocations", "last_used_at", "id"];
  page(
    "Live instances",
    table(
      cols,
      list.map((i) => h("tr", {}, cols.map((c) => h("td", {}, i[c] == null ? "—" : typeof i[c] === "object" ? JSON.stringify(i[c]) : String(i[c]))))),
      "No live instances: instances start on the first invocation and are reaped after their keep-alive.",
    ),
  );
}

async function auditPage() {
  const data = await api.get("/v1/audit?limit=200");
  const list = data.events || [];
  const cols = list.length ? Object.keys(list[0]).slice(0, 8) : ["time"];
  page("Audit trail (refused syscalls)", table(cols, list.map((e) => h("tr", {}, cols.map((c) => h("td", {}, e[c] == null ? "—" : typeof e[c] === "object" ? JSON.stringify(e[c]) : String(e[c]))))), "No refused syscalls recorded."));
}

async function pricingPage() {
  const data = await api.get("/v1/pricing");
  page("Price list", kv([["currency", data.currency], ["set", data.default ? "default prices" : fmtTime(data.set_at)]]), pre(json(data.price_list || data)));
}

route();
