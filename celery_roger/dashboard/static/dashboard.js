// The roger dashboard page (served same-origin; the Content-Security-Policy allows no inline
// script). Every value from the JSON API reaches the page as text (textContent, text nodes,
// dataset): nothing here parses a string as HTML or JS. Actions are buttons carrying their
// arguments in data-* attributes, read by one delegated click listener.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // An element with text children; `data` fills dataset, `cls` the class, `href` the link.
  function h(tag, opts, ...children) {
    const e = document.createElement(tag);
    const o = opts || {};
    if (o.cls) e.className = o.cls;
    if (o.href) e.setAttribute("href", o.href);
    if (o.data) for (const [k, v] of Object.entries(o.data)) e.dataset[k] = String(v);
    if (o.type) e.type = o.type;
    for (const c of children) e.append(c instanceof Node ? c : text(c));
    return e;
  }
  const text = (v) => (v === null || v === undefined ? "-" : String(v));
  const ago = (t) => (t ? Math.max(0, Date.now() / 1000 - t).toFixed(0) + "s ago" : "-");
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

  // Flower's base URL (--flower-url), or "" when the dashboard was not given one.
  const flower = document.body.dataset.flower || "";
  const flowerLink = (id) => (flower ? h("a", {cls: "flower", href: flower + "/task/" +
    encodeURIComponent(text(id))}, "flower") : "");
  const jobLink = (id) => h("span", null, h("a", {href: "/jobs/" + encodeURIComponent(text(id))},
    h("code", null, text(id))), flower ? " " : "", flowerLink(id));
  const button = (label, action, data) => h("button", {type: "button", data: {action, ...data}},
    label);

  function table(head, rows) {
    const t = h("table", null, h("tr", null, ...head.map((c) => h("th", null, c))));
    for (const row of rows) t.append(h("tr", null, ...row.map((c) => h("td", null, c))));
    return t;
  }

  // What each action button does, from its data-* attributes.
  const ACTIONS = {
    pause: (d) => ({path: `/api/roger/queues/${segment(d.queue)}/pause`,
      confirm: `Pause queue ${d.queue}?`}),
    resume: (d) => ({path: `/api/roger/queues/${segment(d.queue)}/resume`}),
    cancel: (d) => ({path: `/api/roger/jobs/${segment(d.job)}/cancel`,
      confirm: `Cancel job ${d.job}?`}),
    requeue: (d) => ({path: `/api/roger/buried/${segment(d.job)}/requeue`}),
    purge: () => ({path: "/api/roger/buried/purge", confirm: "Purge every buried job?"}),
  };

  async function act(name, data) {
    if (name === "token") {
      const t = prompt("dashboard token");
      if (t !== null) sessionStorage.setItem("rogerToken", t);
      return;
    }
    const make = Object.prototype.hasOwnProperty.call(ACTIONS, name) ? ACTIONS[name] : null;
    if (!make) throw new Error("unknown action " + JSON.stringify(name));
    const a = make(data);
    if (a.confirm && !confirm(a.confirm)) return;
    const r = await fetch(a.path, {method: "POST", headers:
      {"Authorization": "Bearer " + (sessionStorage.getItem("rogerToken") || "")}});
    const body = await r.json().catch(() => ({}));
    msg(r.ok ? "done: " + JSON.stringify(body) : "refused (" + r.status + "): " + body.error);
    refresh();
  }

  async function getJSON(path) {
    const r = await fetch(path);
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(r.status + ": " + text(body.error));
    return body;
  }

  function show(...nodes) { $("view").replaceChildren(...nodes); }

  async function overview() {
    const i = await getJSON("/api/roger/info");
    const queues = Object.entries(i.queues).map(([name, v]) => [
      name, text(v.depth),
      v.paused ? h("span", {cls: "paused"}, "paused " + ago(v.paused_at) +
        (v.paused_reason ? " (" + v.paused_reason + ")" : "")) : "no",
      text(v.running), text(v.parked), text(v.held_for_pause), text(v.buried),
      v.paused ? button("resume", "resume", {queue: name})
        : button("pause", "pause", {queue: name})]);
    const running = i.running.jobs.map((j) => [jobLink(j.id), text(j.task), text(j.queue),
      text(j.worker), ago(j.since), text(j.execution_key), button("cancel", "cancel", {job: j.id})]);
    const limits = i.limits || {};
    const keyLimit = (k) => (limits.execution || {})[k] !== undefined
      ? `${limits.execution[k]} (live)` : "";
    const keys = i.execution_keys.keys.map((k) => [text(k.key), text(k.slot), keyLimit(k.key),
      jobLink(k.holder), text(k.worker),
      k.worker_alive ? "yes" : h("span", {cls: "paused"}, "no"), ago(k.since), text(k.parked)]);
    const rates = ((i.rates || {}).keys || []).map((r) => [text(r.key),
      text((limits.rate || {})[r.key] || "its jobs' own"), text(r.waiting),
      `${text(r.opens_in)} s`]);
    show(
      h("h3", null, "Queues"),
      table(["queue", "depth", "paused", "running", "parked", "held", "buried", ""], queues),
      h("h3", null, `Running (${text(i.running.count)})`),
      table(["job", "task", "queue", "worker", "since", "execution key", ""], running),
      h("h3", null, `Execution keys (${text(i.execution_keys.count)})`),
      table(["key", "slot", "live limit", "holder", "worker", "alive", "since", "parked"], keys),
      h("h3", null, `Rate keys with jobs waiting (${text((i.rates || {}).count)})`),
      table(["rate key", "rate", "waiting", "next start in"], rates),
      h("h3", null, `Throttled queue keys (${text((i.throttles || {}).count)})`),
      table(["queue key", "holder", "window ends in"], ((i.throttles || {}).keys || []).map(
        (t) => [text(t.key), jobLink(t.holder), `${text(t.ends_in)} s`])),
      h("h3", null, `Queue keys: ${text(i.queue_keys.count)} \u00b7 waiting retries: ` +
        `${text(i.retrying)} \u00b7 buried: ${text(i.buried.count)} \u00b7 cancellations: ` +
        text(i.cancellations.count)),
      table(["cancelled job"], i.cancellations.ids.map((id) => [jobLink(id)])));
  }

  async function jobPage(id) {
    const j = await getJSON("/api/roger/jobs/" + segment(id));
    const rows = Object.entries(j).filter(([k]) => k !== "explanation").map(([k, v]) =>
      [k, h("code", null, v !== null && typeof v === "object" ? JSON.stringify(v) : text(v))]);
    const buttons = [button("cancel", "cancel", {job: id})];
    if (j.state === "buried") buttons.push(button("requeue", "requeue", {job: id}));
    show(h("h3", null, "Job ", h("code", null, id), flower ? " " : "", flowerLink(id)),
      h("p", null, h("b", null, text(j.explanation))),
      table(["field", "value"], rows), ...buttons);
  }

  async function buriedPage() {
    const b = await getJSON("/api/roger/buried?limit=200");
    show(h("h3", null, "Buried (newest first)"), button("purge all", "purge", {}),
      table(["job", "task", "queue", "retries", "buried", "error", ""], b.map((j) => [
        jobLink(j.id), text(j.task), text(j.queue), text(j.retry_count), ago(j.buried_at),
        h("code", null, text(j.error)), button("requeue", "requeue", {job: j.id})])));
  }

  function refresh() {
    const p = location.pathname;
    let page;
    try {
      page = p.startsWith("/jobs/") ? jobPage(decodeURIComponent(p.slice(6)))
        : p === "/buried" ? buriedPage() : overview();
    } catch (e) {
      page = Promise.reject(e);
    }
    page.catch((e) => msg("error: " + e.message));
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target instanceof Element ? ev.target.closest("button[data-action]") : null;
    if (!b) return;
    ev.preventDefault();
    act(b.dataset.action, {...b.dataset}).catch((e) => msg("error: " + e.message));
  });
  document.addEventListener("submit", (ev) => {
    if (ev.target.id !== "find") return;
    ev.preventDefault();
    const id = $("jobid").value.trim();
    if (id) location.href = "/jobs/" + encodeURIComponent(id);
  });

  refresh();
  setInterval(refresh, 2000);
})();
