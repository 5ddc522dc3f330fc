// The Sandpit web console: sign in with an API token, then sandboxes (live status, create,
// terminal, files, previews, hibernate, destroy), template builds with their log, and the
// workspace's usage against its limits. Everything goes through the /v1 API (api.js).
// Text from the server is only ever set as text (textContent), never parsed as HTML.

import { api, ApiError, qs, setToken, sse, token } from "./api.js";
import { LiveTerminal } from "./terminal.js";

const $ = (id) => document.getElementById(id);

/** An element with attributes (`on*` functions become listeners) and children. */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== undefined && c !== null) e.append(c);
  return e;
}

function message(err) {
  return err instanceof ApiError ? err.message : String(err?.message ?? err);
}

/** Run `fn`, showing its failure in the element `errorId` (cleared first). */
async function guarded(errorId, fn) {
  const out = $(errorId);
  out.textContent = "";
  try {
    return await fn();
  } catch (e) {
    out.textContent = message(e);
    if (e instanceof ApiError && e.status === 401) signOut();
  }
}

const state = {
  sandboxes: [],
  selected: null,
  previewDomain: "localhost",
  events: null,
  poll: null,
  refreshTimer: null,
  filesPath: "/tmp",
};

const terminal = new LiveTerminal($("terminal"), (s) => {
  $("term-state").textContent = s;
});

// ---- sign in ----------------------------------------------------------------------------

function showSignIn() {
  $("sign-in-view").hidden = false;
  $("console-view").hidden = true;
  $("sign-out").hidden = true;
  $("workspace").textContent = "";
  $("live").textContent = "";
  $("token").focus();
}

function signOut() {
  setToken(null);
  state.events?.abort();
  clearInterval(state.poll);
  terminal.close();
  state.selected = null;
  showSignIn();
}

$("sign-in").addEventListener("submit", async (e) => {
  e.preventDefault();
  setToken($("token").value.trim());
  $("token").value = "";
  try {
    await start();
  } catch (err) {
    setToken(null);
    showSignIn();
    $("sign-in-error").textContent = message(err);
  }
});

$("sign-out").addEventListener("click", signOut);

async function start() {
  const usage = await api("GET", "/v1/usage");
  const config = await fetch("/ui/config.json").then((r) => r.json());
  state.previewDomain = config.preview_domain;
  $("sign-in-error").textContent = "";
  $("sign-in-view").hidden = true;
  $("console-view").hidden = false;
  $("sign-out").hidden = false;
  $("workspace").textContent = `workspace ${usage.workspace_id}`;
  renderUsage(usage);
  await Promise.all([refreshSandboxes(), refreshTemplates()]);
  followEvents();
  clearInterval(state.poll);
  // The event stream says when to look again; the poll covers what it does not carry.
  state.poll = setInterval(() => {
    refreshSandboxes();
    refreshUsage();
  }, 5000);
}

// ---- live status: the workspace's event stream ------------------------------------------

function followEvents() {
  state.events?.abort();
  const ctrl = new AbortController();
  state.events = ctrl;
  let lastId;
  const run = async () => {
    while (!ctrl.signal.aborted) {
      try {
        $("live").textContent = "● live";
        await sse("/v1/events", (ev) => {
          lastId = ev.id ?? lastId;
          scheduleRefresh();
          if (ev.event === "build_finished") refreshTemplates();
        }, { signal: ctrl.signal, lastEventId: lastId });
      } catch (e) {
        if (ctrl.signal.aborted) return;
        $("live").textContent = `○ events: ${message(e)}`;
      }
      await new Promise((r) => setTimeout(r, 3000));
    }
  };
  run();
}

function scheduleRefresh() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => {
    refreshSandboxes();
    refreshUsage();
  }, 200);
}

// ---- sandboxes --------------------------------------------------------------------------

async function refreshSandboxes() {
  try {
    const status = $("status-filter").value || undefined;
    const { sandboxes } = await api("GET", `/v1/sandboxes${qs({ status })}`);
    state.sandboxes = sandboxes;
    renderSandboxes();
    if (state.selected) {
      const s = sandboxes.find((x) => x.id === state.selected.id);
      if (s) showSandbox(s);
      else if (!status) refreshSelected();
    }
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) signOut();
  }
}

async function refreshSelected() {
  if (!state.selected) return;
  try {
    showSandbox(await api("GET", `/v1/sandboxes/${encodeURIComponent(state.selected.id)}`));
  } catch {
    // Gone: keep what was shown.
  }
}

function renderSandboxes() {
  const f = $("filter").value.trim().toLowerCase();
  const shown = state.sandboxes.filter((s) => {
    if (!f) return true;
    const meta = Object.entries(s.metadata ?? {}).map(([k, v]) => `${k}=${v}`).join(" ");
    return `${s.id} ${s.template} ${s.status} ${meta}`.toLowerCase().includes(f);
  });
  $("sandboxes").replaceChildren(
    ...shown.map((s) =>
      el(
        "li",
        { class: state.selected?.id === s.id ? "selected" : undefined, dataset: { id: s.id, status: s.status } },
        el(
          "button",
          { type: "button", class: "link", onclick: () => select(s) },
          el("span", { class: "mono" }, s.id),
          " ",
          el("span", { class: `status ${s.status}` }, s.status),
          " ",
          el("span", { class: "muted" }, s.template),
        ),
      ),
    ),
  );
  if (shown.length === 0) $("sandboxes").append(el("li", { class: "muted" }, "none"));
}

$("filter").addEventListener("input", renderSandboxes);
$("status-filter").addEventListener("change", refreshSandboxes);

function select(s) {
  const changed = state.selected?.id !== s.id;
  showTab("sandbox");
  showSandbox(s);
  renderSandboxes();
  if (changed) {
    terminal.close();
    $("terminal").replaceChildren();
    $("term-state").textContent = "";
    $("ports").replaceChildren();
    state.filesPath = "/tmp";
    $("files-path").value = state.filesPath;
    if (s.status === "running") listFiles();
    else $("files").replaceChildren();
  }
}

function showSandbox(s) {
  state.selected = s;
  $("no-selection").hidden = true;
  $("sandbox").hidden = false;
  $("sb-id").textContent = s.id;
  const status = $("sb-status");
  status.textContent = s.status;
  status.className = `status ${s.status}`;
  $("sb-meta").textContent = `${s.template} · ${s.mode} · ${s.size} · previews ${s.preview?.privacy ?? "private"}${s.error ? ` · ${s.error}` : ""}`;
  const gone = s.status === "destroyed" || s.status === "failed";
  $("sb-destroy").disabled = s.status === "destroyed";
  $("sb-hibernate").disabled = gone || s.status !== "running";
  for (const id of ["term-open", "upload", "ports-refresh"]) $(id).disabled = gone;
}

$("create").addEventListener("submit", (e) => {
  e.preventDefault();
  const btn = e.submitter;
  btn.disabled = true;
  guarded("create-error", async () => {
    const s = await api("POST", "/v1/sandboxes", {
      json: { template: $("create-template").value, mode: $("create-mode").value },
    });
    $("status-filter").value = "";
    await refreshSandboxes();
    select(s);
    refreshUsage();
  }).finally(() => {
    btn.disabled = false;
  });
});

$("sb-destroy").addEventListener("click", () => {
  const s = state.selected;
  if (!s || !confirm(`Destroy ${s.id}? Its files are deleted.`)) return;
  guarded("sb-error", async () => {
    terminal.close();
    await api("DELETE", `/v1/sandboxes/${encodeURIComponent(s.id)}`);
    await refreshSelected();
    await refreshSandboxes();
    refreshUsage();
  });
});

$("sb-hibernate").addEventListener("click", () => {
  const s = state.selected;
  guarded("sb-error", async () => {
    await api("POST", `/v1/sandboxes/${encodeURIComponent(s.id)}/hibernate`);
    await refreshSelected();
    await refreshSandboxes();
  });
});

// ---- terminal ---------------------------------------------------------------------------

$("term-open").addEventListener("click", () => {
  guarded("sb-error", () => terminal.open(state.selected.id));
});

// ---- files ------------------------------------------------------------------------------

function filesUrl(path) {
  return `/v1/sandboxes/${encodeURIComponent(state.selected.id)}/files${qs({ path })}`;
}

function join(dir, name) {
  return `${dir.replace(/\/+$/, "")}/${name}`;
}

async function listFiles() {
  const dir = state.filesPath;
  const id = state.selected.id;
  await guarded("sb-error", async () => {
    const list = await api("GET", `/v1/sandboxes/${encodeURIComponent(id)}/files/list${qs({ path: dir })}`);
    if (state.selected?.id !== id) return;
    $("files").replaceChildren(
      el("tr", {}, el("th", {}, "name"), el("th", {}, "kind"), el("th", {}, "size"), el("th", {}, "")),
      ...list.entries.map((f) =>
        el(
          "tr",
          { dataset: { name: f.name } },
          el(
            "td",
            { class: "mono" },
            f.kind === "dir"
              ? el("button", { type: "button", class: "link", onclick: () => openDir(join(dir, f.name)) }, `${f.name}/`)
              : f.name,
          ),
          el("td", {}, f.kind),
          el("td", { class: "num" }, f.kind === "file" ? String(f.size) : ""),
          el("td", {}, f.kind === "file" ? el("button", { type: "button", onclick: () => download(join(dir, f.name), f.name) }, "Download") : ""),
        ),
      ),
    );
  });
}

function openDir(path) {
  state.filesPath = path || "/";
  $("files-path").value = state.filesPath;
  listFiles();
}

$("files-nav").addEventListener("submit", (e) => {
  e.preventDefault();
  openDir($("files-path").value.trim());
});

$("files-up").addEventListener("click", () => {
  openDir(state.filesPath.replace(/\/+$/, "").replace(/\/[^/]*$/, "") || "/");
});

async function download(path, name) {
  await guarded("sb-error", async () => {
    const resp = await api("GET", filesUrl(path), { raw: true });
    const url = URL.createObjectURL(await resp.blob());
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
}

$("upload").addEventListener("click", () => {
  const file = $("upload-file").files[0];
  if (!file) {
    $("sb-error").textContent = "choose a file to upload first";
    return;
  }
  guarded("sb-error", async () => {
    await api("PUT", filesUrl(join(state.filesPath, file.name)), { body: file });
    $("upload-file").value = "";
    await listFiles();
  });
});

// ---- previews ---------------------------------------------------------------------------

$("ports-refresh").addEventListener("click", () => {
  const s = state.selected;
  guarded("sb-error", async () => {
    const { ports } = await api("GET", `/v1/sandboxes/${encodeURIComponent(s.id)}/ports`);
    $("ports").replaceChildren(
      ...ports.map((p) => {
        const item = el("li", { dataset: { port: String(p.port) } }, el("span", { class: "mono" }, `${p.port}`), ` on ${p.address} `);
        if (p.address.startsWith("127.") || p.address === "::1") {
          item.append(el("span", { class: "muted" }, "(loopback only: no preview)"));
        } else {
          item.append(el("button", { type: "button", onclick: () => previewLink(s, p.port, item) }, "Preview link"));
        }
        return item;
      }),
    );
    if (ports.length === 0) $("ports").append(el("li", { class: "muted" }, "no port is listening"));
  });
});

async function previewLink(s, port, item) {
  await guarded("sb-error", async () => {
    let url = `${location.protocol}//${s.id}-${port}.${state.previewDomain}/`;
    if ((s.preview?.privacy ?? "private") === "private") {
      const t = await api("POST", `/v1/sandboxes/${encodeURIComponent(s.id)}/preview-tokens`, { json: {} });
      // A preview token opens only this sandbox's previews; the link trades it for a cookie
      // on the preview's own host at first use.
      url += `?preview_token=${encodeURIComponent(t.token)}`;
    }
    item.querySelector("a")?.remove();
    item.append(el("a", { href: url, target: "_blank", rel: "noopener noreferrer", class: "preview" }, "open"));
  });
}

// ---- templates and builds ---------------------------------------------------------------

async function refreshTemplates() {
  try {
    const { templates } = await api("GET", "/v1/templates");
    const names = [...new Set(templates.filter((t) => t.status === "ready").map((t) => t.name))];
    const sel = $("create-template");
    const keep = sel.value;
    sel.replaceChildren(...names.map((n) => el("option", { value: n, selected: n === keep || (!keep && n === "base") }, n)));
    $("templates").replaceChildren(
      el("tr", {}, el("th", {}, "name"), el("th", {}, "version"), el("th", {}, "status"), el("th", {}, "created"), el("th", {}, "")),
      ...templates.map((t) =>
        el(
          "tr",
          { dataset: { id: t.id } },
          el("td", { class: "mono" }, t.name),
          el("td", { class: "num" }, String(t.version ?? "")),
          el("td", {}, el("span", { class: `status ${t.status}` }, t.status)),
          el("td", { class: "muted" }, t.created_at ?? ""),
          el(
            "td",
            {},
            t.source === "builtin" || t.status === "not_built"
              ? ""
              : el("button", { type: "button", onclick: () => guarded("build-error", () => followBuild(t)) }, "Build log"),
          ),
        ),
      ),
    );
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) signOut();
  }
}

$("build").addEventListener("submit", (e) => {
  e.preventDefault();
  const btn = e.submitter;
  btn.disabled = true;
  guarded("build-error", async () => {
    const t = await api("POST", "/v1/templates", {
      json: { name: $("build-name").value.trim(), dockerfile: $("build-dockerfile").value },
    });
    refreshTemplates();
    await followBuild(t);
  }).finally(() => {
    btn.disabled = false;
  });
});

async function followBuild(t) {
  const log = $("build-log");
  const stateEl = $("build-state");
  log.textContent = "";
  stateEl.textContent = `${t.name} v${t.version}: building`;
  stateEl.dataset.status = "building";
  const line = (s) => {
    log.append(s);
    log.scrollTop = log.scrollHeight;
  };
  // Step lines start on a line of their own, whatever the output before them ended with.
  const newline = () => (log.textContent && !log.textContent.endsWith("\n") ? "\n" : "");
  await sse(`/v1/templates/${encodeURIComponent(t.id)}/build`, ({ data }) => {
    const ev = JSON.parse(data);
    if (ev.type === "step") line(`${newline()}Step ${ev.index}/${ev.total}: ${ev.instruction}\n`);
    else if (ev.type === "log") line(ev.text);
    else if (ev.type === "step_done") line(`${newline()}  done${ev.cached ? " (cached)" : ""} in ${ev.elapsed_ms} ms\n`);
    else if (ev.type === "finished") {
      line(`${newline()}Build ${ev.status}${ev.error ? `: ${ev.error}` : ""} in ${ev.elapsed_ms} ms\n`);
      stateEl.textContent = `${t.name} v${t.version}: ${ev.status}`;
      stateEl.dataset.status = ev.status;
    }
  });
  refreshTemplates();
  refreshUsage();
}

// ---- usage ------------------------------------------------------------------------------

const USAGE_ROWS = [
  ["running", "Running sandboxes"],
  ["suspended", "Kept suspended"],
  ["sandboxes_hourly", "Creates this hour"],
  ["requests_hourly", "Requests this hour"],
  ["templates", "Templates"],
  ["builds", "Builds at once"],
  ["snapshots", "Snapshots"],
  ["volumes", "Volumes"],
];

async function refreshUsage() {
  try {
    renderUsage(await api("GET", "/v1/usage"));
  } catch {
    // The next refresh tries again.
  }
}

/** The running and kept-suspended counts over the last 10 minutes, sampled here. */
const samples = [];
const SAMPLES = 120;
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

function renderChart() {
  const w = 300;
  const h = 60;
  const max = Math.max(1, ...samples.flatMap((x) => [x.running, x.suspended]));
  const line = (key, cls) => {
    const step = w / (SAMPLES - 1);
    const x0 = w - (samples.length - 1) * step;
    const points = samples.map((x, i) => `${(x0 + i * step).toFixed(1)},${(h - 4 - (x[key] / max) * (h - 8)).toFixed(1)}`);
    return svg("polyline", { points: points.join(" "), class: cls });
  };
  const chart = svg("svg", { viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": "running and suspended sandboxes, last 10 minutes" });
  chart.append(svg("line", { x1: 0, y1: h - 4, x2: w, y2: h - 4, class: "axis" }), line("suspended", "suspended"), line("running", "running"));
  $("usage-chart").replaceChildren(chart);
  $("usage-chart-max").textContent = `max ${max}`;
}

function renderUsage(u) {
  samples.push({ running: u.running.used, suspended: u.suspended.used });
  if (samples.length > SAMPLES) samples.shift();
  renderChart();
  $("usage").replaceChildren(
    ...USAGE_ROWS.map(([key, label]) => {
      const { used, limit } = u[key];
      return el(
        "tr",
        { dataset: { key } },
        el("td", {}, label),
        el("td", { class: "num" }, limit ? `${used} / ${limit}` : `${used}`),
        el("td", {}, limit ? el("meter", { min: "0", max: String(limit), value: String(used), high: String(limit * 0.8) }) : el("span", { class: "muted" }, "no limit")),
      );
    }),
  );
}

// ---- tabs -------------------------------------------------------------------------------

function showTab(name) {
  for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  $("tab-sandbox").hidden = name !== "sandbox";
  $("tab-templates").hidden = name !== "templates";
  if (name === "templates") refreshTemplates();
}

for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));

// ---- start ------------------------------------------------------------------------------

if (token()) {
  start().catch(() => signOut());
} else {
  showSignIn();
}
