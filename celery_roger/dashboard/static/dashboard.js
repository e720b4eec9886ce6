// The roger console (served same-origin; the Content-Security-Policy allows no inline
// script). Every value from the JSON API reaches the page as text (textContent, text nodes,
// dataset): nothing here parses a string as HTML or JS. Actions are buttons carrying their
// arguments in data-* attributes, read by one delegated click listener.
//
// Pages: / (overview), /jobs/<id>, /lists/<kind> (and /buried), /audit. Each refreshes every
// 2 s in place: the view is rebuilt only when the data changed, and selected rows stay
// selected. "pause refresh" (or the p key) stops it. Keys: / job search, p pause refresh,
// n next page, f first page, r refresh now.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // An element with text children; `data` fills dataset, `cls` the class, `href` the link.
  function h(tag, opts, ...children) {
    const e = document.createElement(tag);
    const o = opts || {};
    if (o.cls) e.className = o.cls;
    if (o.href) e.setAttribute("href", o.href);
    if (o.title) e.title = o.title;
    if (o.id) e.id = o.id;
    if (o.data) for (const [k, v] of Object.entries(o.data)) e.dataset[k] = String(v);
    if (o.type) e.type = o.type;
    if (o.name) e.name = o.name;
    if (o.value !== undefined) e.value = o.value;
    if (o.placeholder) e.placeholder = o.placeholder;
    for (const c of children) e.append(c instanceof Node ? c : text(c));
    return e;
  }
  const text = (v) => (v === null || v === undefined ? "-" : String(v));
  const ago = (t) => (t ? Math.max(0, Date.now() / 1000 - t).toFixed(0) + "s ago" : "-");
  const inSecs = (t) => (t ? "in " + Math.max(0, t - Date.now() / 1000).toFixed(0) + "s" : "-");
  const stamp = (t) => new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  // A time, relative (and absolute beside it, and in the tooltip).
  // (The relative part is kept current by tick(), without rebuilding the view.)
  const when = (t, future) => (t ? h("span", {title: stamp(t)},
    h("span", {cls: "when", data: {t, future: future ? 1 : ""}}, future ? inSecs(t) : ago(t)),
    h("span", {cls: "muted"}, " \u00b7 " + stamp(t))) : "-");
  const rel = (t) => (t ? h("span", {cls: "when", title: stamp(t), data: {t, future: ""}},
    ago(t)) : "-");
  function tick() {
    for (const e of document.querySelectorAll("#view .when")) {
      const t = Number(e.dataset.t);
      e.textContent = e.dataset.future ? inSecs(t) : ago(t);
    }
  }
  const msg = (s) => { $("msg").textContent = s; };

  // A value as one URL path segment. "." and ".." cannot be one: browsers resolve them
  // (even as %2E), so the request would reach another URL.
  function segment(value) {
    const s = String(value ?? "");
    if (s === "" || s === "." || s === "..") {
      throw new Error(`${JSON.stringify(s)} cannot be sent from the page: use the CLI`);
    }
    return encodeURIComponent(s);
  }
  const query = (params) => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
    const s = q.toString();
    return s ? "?" + s : "";
  };

  // Flower's base URL (--flower-url), or "" when the dashboard was not given one.
  const flower = document.body.dataset.flower || "";
  const flowerLink = (id) => (flower ? h("a", {cls: "flower", href: flower + "/task/" +
    encodeURIComponent(text(id))}, "flower") : "");
  const jobLink = (id) => (id === null || id === undefined ? "-" : h("span", null,
    h("a", {href: "/jobs/" + encodeURIComponent(text(id))}, h("code", null, text(id))),
    flower ? " " : "", flowerLink(id)));
  const lineLink = (key, label) => h("a", {href: "/lists/parked" + query({key})}, label);
  const button = (label, action, data) => h("button", {type: "button", data: {action, ...data}},
    label);

  function table(head, rows) {
    const t = h("table", null, h("tr", null, ...head.map((c) => h("th", null, c))));
    for (const row of rows) t.append(h("tr", null, ...row.map((c) => h("td", null, c))));
    return t;
  }

  // -- actions --------------------------------------------------------------------------

  const selected = new Set();  // ids chosen on this page (kept across refreshes)
  const chosen = () => [...selected];
  const plural = (n, what) => `${n} ${what}${n === 1 ? "" : "s"}`;

  // What each action button does, from its data-* attributes.
  const ACTIONS = {
    pause: (d) => ({path: `/api/roger/queues/${segment(d.queue)}/pause`,
      confirm: `Pause queue ${d.queue}?`}),
    resume: (d) => ({path: `/api/roger/queues/${segment(d.queue)}/resume`,
      confirm: `Resume queue ${d.queue}?`}),
    cancel: (d) => ({path: `/api/roger/jobs/${segment(d.job)}/cancel`,
      confirm: `Cancel job ${d.job}?`}),
    requeue: (d) => ({path: `/api/roger/buried/${segment(d.job)}/requeue`,
      confirm: `Requeue buried job ${d.job}?`}),
    purge: () => ({path: "/api/roger/buried/purge", confirm: "Purge every buried job?"}),
    "purge-one": (d) => ({path: "/api/roger/buried/purge", body: {ids: [d.job]},
      confirm: `Purge buried job ${d.job}?`}),
    release: (d) => ({path: `/api/roger/keys/${segment(d.kind)}/release`, body: {key: d.key},
      confirm: `Release ${d.kind} key ${d.key}?` + (d.kind === "execution"
        ? " (its next parked job starts; its holder is not stopped)" : "")}),
    "bulk-requeue": () => ({path: "/api/roger/buried/requeue", body: {ids: chosen()},
      confirm: `Requeue ${plural(selected.size, "buried job")}?`}),
    "bulk-purge": () => ({path: "/api/roger/buried/purge", body: {ids: chosen()},
      confirm: `Purge ${plural(selected.size, "buried job")}?`}),
    "bulk-cancel": () => ({path: "/api/roger/jobs/cancel", body: {ids: chosen()},
      confirm: `Cancel ${plural(selected.size, "job")}?`}),
  };

  async function act(name, data) {
    if (name === "token") {
      const t = prompt("dashboard token");
      if (t !== null) sessionStorage.setItem("rogerToken", t);
      return;
    }
    if (name === "toggle-refresh") { toggleRefresh(); return; }
    if (name === "select-all") {
      for (const box of document.querySelectorAll("input[data-select]")) {
        box.checked = true; selected.add(box.dataset.select);
      }
      return;
    }
    if (name === "select-none") {
      selected.clear();
      for (const box of document.querySelectorAll("input[data-select]")) box.checked = false;
      return;
    }
    const make = Object.prototype.hasOwnProperty.call(ACTIONS, name) ? ACTIONS[name] : null;
    if (!make) throw new Error("unknown action " + JSON.stringify(name));
    const a = make(data);
    if (a.body && a.body.ids && !a.body.ids.length) { msg("select rows first"); return; }
    if (a.confirm && !confirm(a.confirm)) return;
    const headers = {"Authorization": "Bearer " + (sessionStorage.getItem("rogerToken") || "")};
    if (a.body) headers["Content-Type"] = "application/json";
    const r = await fetch(a.path, {method: "POST", headers,
      body: a.body ? JSON.stringify(a.body) : undefined});
    const body = await r.json().catch(() => ({}));
    msg(r.ok ? "done: " + JSON.stringify(body) : "refused (" + r.status + "): " + body.error);
    if (r.ok && a.body && a.body.ids) selected.clear();
    refresh(true);
  }

  async function getJSON(path) {
    const r = await fetch(path);
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(r.status + ": " + text(body.error));
    return body;
  }

  function show(...nodes) { $("view").replaceChildren(...nodes); }

  // -- the overview -----------------------------------------------------------------------

  function overview(i) {
    const queues = Object.entries(i.queues).map(([name, v]) => [
      name, text(v.depth),
      v.paused ? h("span", {cls: "paused"}, "paused " + ago(v.paused_at) +
        (v.paused_reason ? " (" + v.paused_reason + ")" : "")) : "no",
      text(v.running), text(v.parked), text(v.held_for_pause), text(v.buried),
      v.paused ? button("resume", "resume", {queue: name})
        : button("pause", "pause", {queue: name})]);
    const running = i.running.jobs.map((j) => [jobLink(j.id), text(j.task), text(j.queue),
      text(j.worker), rel(j.since), text(j.execution_key), button("cancel", "cancel", {job: j.id})]);
    const limits = i.limits || {};
    const keyLimit = (k) => (limits.execution || {})[k] !== undefined
      ? `${limits.execution[k]} (live)` : "";
    const keys = i.execution_keys.keys.map((k) => [text(k.key), text(k.slot), keyLimit(k.key),
      jobLink(k.holder), text(k.worker),
      k.worker_alive ? "yes" : h("span", {cls: "paused"}, "no"), rel(k.since),
      k.parked ? lineLink(k.key, text(k.parked)) : text(k.parked)]);
    const rates = ((i.rates || {}).keys || []).map((r) => [text(r.key),
      text((limits.rate || {})[r.key] || "its jobs' own"), text(r.waiting),
      `${text(r.opens_in)} s`]);
    const link = (kind, label) => h("a", {href: "/lists/" + kind}, label);
    return [
      h("h3", null, "Queues"),
      table(["queue", "depth", "paused", "running", "parked", "held", "buried", ""], queues),
      h("h3", null, link("running", `Running (${text(i.running.count)})`)),
      table(["job", "task", "queue", "worker", "since", "execution key", ""], running),
      h("h3", null, link("execution_keys", `Execution keys (${text(i.execution_keys.count)})`)),
      table(["key", "slot", "live limit", "holder", "worker", "alive", "since", "parked"], keys),
      h("h3", null, `Rate keys with jobs waiting (${text((i.rates || {}).count)})`),
      table(["rate key", "rate", "waiting", "next start in"], rates),
      h("h3", null, `Throttled queue keys (${text((i.throttles || {}).count)})`),
      table(["queue key", "holder", "window ends in"], ((i.throttles || {}).keys || []).map(
        (t) => [text(t.key), jobLink(t.holder), `${text(t.ends_in)} s`])),
      h("h3", null, link("queue_keys", `Queue keys: ${text(i.queue_keys.count)}`), " \u00b7 ",
        link("retries", `waiting retries: ${text(i.retrying)}`), " \u00b7 ",
        link("buried", `buried: ${text(i.buried.count)}`), " \u00b7 ",
        link("cancelled", `cancellations: ${text(i.cancellations.count)}`)),
      table(["cancelled job"], i.cancellations.ids.map((id) => [jobLink(id)]))];
  }

  // -- one job ------------------------------------------------------------------------------

  const TIMES = new Set(["since", "buried_at", "paused_at", "next_run"]);
  const LINKS = new Set(["holder", "promoted_by", "queue_key_holder"]);

  function jobPage(id, j) {
    const rows = Object.entries(j).filter(([k]) => k !== "explanation" && k !== "history")
      .map(([k, v]) =>
      [k, TIMES.has(k) && typeof v === "number" ? when(v, k === "next_run")
        : LINKS.has(k) && typeof v === "string" ? jobLink(v)
          : k === "execution_key" && typeof v === "string" ? lineLink(v, h("code", null, v))
            : h("code", null, v !== null && typeof v === "object" ? JSON.stringify(v) : text(v))]);
    const buttons = j.state === "buried"
      ? [button("requeue", "requeue", {job: id}), button("purge", "purge-one", {job: id})]
      : [button("cancel", "cancel", {job: id})];
    const history = (j.history || []).map((e) => [when(e.at), text(e.event), text(e.worker),
      text(e.detail)]);
    return [h("h3", null, "Job ", h("code", null, id), flower ? " " : "", flowerLink(id)),
      h("p", null, h("b", null, text(j.explanation))),
      table(["field", "value"], rows), ...buttons,
      h("h3", null, "History"), history.length ? table(["when", "event", "worker", "detail"],
        history) : h("p", {cls: "muted"}, "none kept (roger_history_ttl)")];
  }

  // -- the lists ------------------------------------------------------------------------------

  const code = (v) => h("code", null, text(v));
  // Per kind: its title, its filters, its columns, a row's cells, and its bulk actions.
  const LISTS = {
    running: {title: "Running jobs", filters: ["queue", "task", "worker"],
      head: ["job", "task", "queue", "worker", "since", "execution key", "queue key"],
      row: (j) => [jobLink(j.id), text(j.task), text(j.queue), text(j.worker),
        when(j.admitted_at), j.execution_key ? lineLink(j.execution_key, code(j.execution_key))
          : "-", text(j.queue_key)], bulk: ["cancel"]},
    parked: {title: "Parked jobs", filters: ["key", "prefix"],
      head: (f) => (f.key ? ["job", "position", "task", "queue", "queue key"]
        : ["execution key", "holder", "parked"]),
      row: (j, f) => (f.key ? [jobLink(j.id), text(j.position), text(j.task), text(j.queue),
        text(j.queue_key)] : [lineLink(j.key, code(j.key)), jobLink(j.holder), text(j.parked)]),
      bulk: (f) => (f.key ? ["cancel"] : [])},
    execution_keys: {title: "Execution keys", filters: ["prefix"],
      head: ["key", "slot", "holder", "parked", ""],
      row: (k) => [code(k.key), text(k.slot), jobLink(k.holder),
        k.parked ? lineLink(k.key, text(k.parked)) : "0",
        button("release", "release", {kind: "execution", key: k.key})], bulk: []},
    queue_keys: {title: "Queue keys", filters: ["prefix"],
      head: ["key", "job", "publish unconfirmed until", ""],
      row: (k) => [code(k.key), jobLink(k.job), k.pending_until ? when(k.pending_until, true)
        : "-", button("release", "release", {kind: "queue", key: k.key})], bulk: []},
    retries: {title: "Waiting retries", filters: ["queue", "task", "since", "until"],
      head: ["job", "task", "queue", "retry", "due"],
      row: (j) => [jobLink(j.id), text(j.task), text(j.queue), text(j.retry_count),
        when(j.due_at, true)], bulk: ["cancel"]},
    held: {title: "Held for a paused queue", filters: ["queue"],
      head: ["job", "queue", "position", "task"],
      row: (j) => [jobLink(j.id), text(j.queue), text(j.position), text(j.task)],
      bulk: ["cancel"]},
    cancelled: {title: "Cancellations", filters: [], head: ["job", "forgotten"],
      row: (j) => [jobLink(j.id), when(j.forgotten_at, true)], bulk: []},
    buried: {title: "Buried (newest first)", filters: ["queue", "task", "error", "since", "until"],
      head: ["job", "task", "queue", "retries", "buried", "error", "arguments", ""],
      row: (j) => [jobLink(j.id), text(j.task), text(j.queue), text(j.retry_count),
        when(j.buried_at), h("details", null, h("summary", null, code(j.error)),
          h("pre", null, text(j.traceback))),
        code(JSON.stringify(j.args) + " " + JSON.stringify(j.kwargs)),
        button("requeue", "requeue", {job: j.id})], bulk: ["requeue", "purge"]},
  };
  const pick = (v, f) => (typeof v === "function" ? v(f) : v);
  const TIME_FILTERS = new Set(["since", "until"]);

  function filterForm(kind, f) {
    const spec = LISTS[kind];
    if (!spec.filters.length) return "";
    const fields = spec.filters.map((name) => h("label", null, name + " ",
      h("input", {name, value: TIME_FILTERS.has(name) && f[name]
        ? stamp(Number(f[name])).slice(0, 19) : (f[name] || ""),
      placeholder: TIME_FILTERS.has(name) ? "YYYY-MM-DD hh:mm:ss" : ""})));
    return h("form", {id: "filters", data: {kind}}, ...fields,
      h("button", {type: "submit"}, "filter"), " ", h("a", {href: "/lists/" + kind}, "clear"));
  }

  function facets(kind, f, found) {
    if (kind !== "buried" || !found) return "";
    const line = (facet) => h("div", {cls: "facets"}, facet + ": ",
      ...Object.entries(found[facet] || {}).map(([v, n]) => h("a", {cls: "facet",
        href: "/lists/buried" + query({...f, cursor: null, [facet]: v})}, `${v} (${n})`)));
    return h("div", null, line("queue"), line("task"), line("error"));
  }

  function listPage(kind, f, page, found) {
    const spec = LISTS[kind];
    const bulk = pick(spec.bulk, f);
    const head = [...pick(spec.head, f), ...(bulk.length ? ["select"] : [])];
    const rows = page.items.map((item) => {
      const cells = spec.row(item, f);
      if (bulk.length) {
        const box = h("input", {type: "checkbox", data: {select: item.id}});
        box.checked = selected.has(item.id);
        cells.push(box);
      }
      return cells;
    });
    const actions = bulk.length ? h("div", {cls: "bulk"},
      button("select all", "select-all", {}), button("select none", "select-none", {}),
      ...bulk.map((b) => button(`${b} selected`, "bulk-" + b, {})),
      kind === "buried" ? button("purge all", "purge", {}) : "") : "";
    const nav = h("div", {cls: "pages"},
      f.cursor ? h("a", {id: "first", href: "/lists/" + kind + query({...f, cursor: null})},
        "first page") : "",
      page.cursor ? h("a", {id: "next", href: "/lists/" + kind + query({...f,
        cursor: page.cursor})}, "next page") : "");
    const count = page.total === null ? `${page.items.length} shown`
      : `${page.items.length} shown of ${page.total}`;
    return [h("h3", null, spec.title + (f.key ? ` behind ${f.key}` : "")),
      filterForm(kind, f), facets(kind, f, found), h("p", {cls: "muted"}, count),
      actions, table(head, rows), nav];
  }

  function auditPage(a) {
    return [h("h3", null, `Audit log (${a.total} actions, newest first)`),
      table(["when", "who", "action", "target", "result"], a.items.map((e) => [
        when(e.at), text(e.label), text(e.action), code(e.target),
        code(JSON.stringify(e.result))]))];
  }

  // -- routing and refresh ------------------------------------------------------------------

  function route() {
    const p = location.pathname;
    const params = Object.fromEntries(new URLSearchParams(location.search));
    if (p.startsWith("/jobs/")) {
      const id = decodeURIComponent(p.slice(6));
      return {load: () => getJSON("/api/roger/jobs/" + segment(id)), draw: (j) => jobPage(id, j)};
    }
    if (p === "/audit") {
      return {load: () => getJSON("/api/roger/audit?limit=200"), draw: auditPage};
    }
    const kind = p === "/buried" ? "buried" : p.startsWith("/lists/") ? p.slice(7) : null;
    if (kind !== null && Object.prototype.hasOwnProperty.call(LISTS, kind)) {
      const f = params;
      const api = {...f};
      for (const t of TIME_FILTERS) if (api[t] && isNaN(Number(api[t]))) delete api[t];
      return {load: async () => [await getJSON(`/api/roger/lists/${kind}` + query(api)),
        kind === "buried" ? await getJSON("/api/roger/buried/facets") : null],
      draw: ([page, found]) => listPage(kind, f, page, found)};
    }
    return {load: () => getJSON("/api/roger/info"), draw: overview};
  }

  let paused = false;
  let last = null;
  let busy = false;
  const current = route();

  function refresh(force) {
    if (busy || (paused && !force)) return;
    busy = true;
    current.load().then((data) => {
      const seen = JSON.stringify(data);
      if (force || seen !== last) {
        last = seen;
        show(...current.draw(data));
      } else {
        tick();
      }
    }).catch((e) => msg("error: " + e.message)).finally(() => { busy = false; });
  }

  function toggleRefresh() {
    paused = !paused;
    const b = $("refresh");
    if (b) b.textContent = paused ? "resume refresh" : "pause refresh";
    if (!paused) refresh(true);
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target instanceof Element ? ev.target.closest("button[data-action]") : null;
    if (!b) return;
    ev.preventDefault();
    act(b.dataset.action, {...b.dataset}).catch((e) => msg("error: " + e.message));
  });
  document.addEventListener("change", (ev) => {
    const box = ev.target;
    if (!(box instanceof HTMLInputElement) || !box.dataset.select) return;
    if (box.checked) selected.add(box.dataset.select); else selected.delete(box.dataset.select);
  });
  document.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (ev.target.id === "find") {
      const id = $("jobid").value.trim();
      if (id) location.href = "/jobs/" + encodeURIComponent(id);
      return;
    }
    if (ev.target.id === "filters") {
      const given = {};
      for (const input of ev.target.querySelectorAll("input[name]")) {
        let v = input.value.trim();
        if (v && TIME_FILTERS.has(input.name)) {
          const t = Date.parse(v.replace(" ", "T") + (/[zZ]|UTC|[+-]\d\d:?\d\d$/.test(v) ? "" : "Z"));
          if (isNaN(t)) { msg(`${input.name}: not a time (YYYY-MM-DD hh:mm:ss, UTC)`); return; }
          v = String(t / 1000);
        }
        given[input.name] = v.replace(/ UTC$/, "");
      }
      location.href = "/lists/" + ev.target.dataset.kind + query(given);
    }
  });
  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    if (ev.ctrlKey || ev.metaKey || ev.altKey ||
        (t instanceof HTMLElement && (t.tagName === "INPUT" || t.tagName === "TEXTAREA"))) return;
    const go = (id) => { const a = $(id); if (a) a.click(); };
    if (ev.key === "/") { ev.preventDefault(); $("jobid").focus(); }
    else if (ev.key === "p") toggleRefresh();
    else if (ev.key === "r") refresh(true);
    else if (ev.key === "n") go("next");
    else if (ev.key === "f") go("first");
  });

  refresh(true);
  setInterval(refresh, 2000);
})();
