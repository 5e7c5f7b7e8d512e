/* The live job page: poll the JSON API every second until the job ends, and update in place. */
"use strict";
(function () {
  const { TERMINAL, el, seconds, bytes, timeEl, badge, fetchJSON, localTime } = window.QF;
  const data = JSON.parse(document.getElementById("job-data").textContent);
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 1000;
  let job = data.job;
  let lastEvent = Math.max(0, ...data.events.map((e) => e.id));
  const liveLosses = {};
  let timer = null, failures = 0, shownLosses = null, shownArtifacts = JSON.stringify(job.artifacts), shownMetrics = JSON.stringify(job.metrics);

  function progressText(j) {
    const p = j.progress;
    const after = p ? " after layer " + p.layers_done + " of " + p.layers_total : "";
    if (j.status === "queued") return "Queued; waiting for a worker.";
    if (j.status === "succeeded") return "Done" + (p ? ": " + p.layers_total + " layers" : "") + ".";
    if (j.status === "failed") return "Failed" + after + ".";
    if (j.status === "cancelled") return "Cancelled" + after + ".";
    if (!p) return "Running" + (j.stage ? " · " + j.stage : "") + "…";
    return "Layer " + p.layers_done + " of " + p.layers_total + (j.stage ? " · " + j.stage : "") +
      (p.eta_seconds !== null && p.eta_seconds !== undefined ? " · about " + seconds(p.eta_seconds) + " left" : "") +
      (j.cancel_requested ? " · cancelling" : "");
  }

  function renderProgress(j) {
    const pct = j.status === "succeeded" ? 100 : j.progress ? Math.round(j.progress.fraction * 1000) / 10 : 0;
    const bar = $("progress");
    bar.className = "progress progress-" + j.status + (j.status === "running" ? " is-running" : "");
    bar.setAttribute("aria-valuenow", pct);
    bar.setAttribute("aria-valuetext", pct + "%");
    $("progress-fill").style.width = pct + "%";
    const text = progressText(j);
    // Only touch the live region when the words change, so screen readers are not flooded.
    if ($("progress-text").textContent !== text) $("progress-text").textContent = text;
  }

  function renderFacts(j) {
    const set = (name, node) => { const dd = document.querySelector('[data-fact="' + name + '"]'); dd.replaceChildren(node); };
    set("stage", document.createTextNode(j.stage || "–"));
    set("attempt", document.createTextNode(String(j.attempt)));
    set("started_at", j.started_at ? timeEl(j.started_at, true) : document.createTextNode("–"));
    set("finished_at", j.finished_at ? timeEl(j.finished_at, true) : document.createTextNode("–"));
    const end = j.finished_at ? new Date(j.finished_at) : new Date();
    set("duration", document.createTextNode(j.started_at ? seconds((end - new Date(j.started_at)) / 1000) : "–"));
  }

  function renderHeader(j) {
    $("job-badge").replaceChildren(badge(j.status, j.cancel_requested));
    const cancelForm = document.querySelector('form[data-action="cancel"]');
    const retryForm = document.querySelector('form[data-action="retry"]');
    const hadFocus = document.activeElement && document.activeElement.closest("#job-actions");
    cancelForm.hidden = !["queued", "running"].includes(j.status);
    retryForm.hidden = !["failed", "cancelled"].includes(j.status);
    const btn = $("btn-cancel");
    btn.disabled = !!j.cancel_requested;
    btn.textContent = j.cancel_requested ? "Cancelling…" : "Cancel job";
    $("btn-retry").disabled = false;
    // A hidden button drops the keyboard focus; hand it to the button that replaced it.
    if (hadFocus && (document.activeElement === document.body || document.activeElement.closest("form[hidden]"))) {
      const visible = [...document.querySelectorAll("#job-actions button")].find((b) => !b.closest("form").hidden && !b.disabled);
      (visible || $("h-progress")).focus();
    }
    const box = $("job-error");
    box.hidden = !j.error;
    if (j.error) { $("error-code").textContent = j.error.code; $("error-message").textContent = j.error.message; }
  }

  // Consecutive progress events share one line, which shows the latest layer.
  function renderEvents(items) {
    const list = $("timeline");
    for (const e of items) {
      if (e.id <= lastEvent && list.querySelector('[data-event-id="' + e.id + '"]')) continue;
      const cls = "ev ev-" + e.kind + (e.to_status ? " ev-to-" + e.to_status : "");
      const prev = list.lastElementChild;
      const merge = e.kind === "progress" && prev && prev.classList.contains("ev-progress");
      const count = merge ? Number(prev.dataset.merged || 1) + 1 : 1;
      const since = merge ? prev.dataset.since || prev.querySelector("time").getAttribute("datetime") : e.at;
      const li = el("li", { class: cls, "data-event-id": e.id, "data-merged": count, "data-since": since }, timeEl(e.at, false),
        el("span", { class: "ev-msg" }, e.to_status ? [badge(e.to_status), " "] : null, e.message || e.stage || e.kind),
        count > 1 ? el("span", { class: "muted small" }, " (" + count + " layer updates since ", timeEl(since, false), ")") : null);
      if (merge) prev.replaceWith(li); else list.append(li);
      lastEvent = Math.max(lastEvent, e.id);
      collectLosses(e);
    }
  }

  function collectLosses(e) {
    const d = e.data || {};
    if (e.kind === "progress" && d.losses && Object.keys(d.losses).length && d.layers_done) liveLosses[String(d.layers_done - 1)] = d.losses;
  }

  async function fileList(artifactId) {
    const body = await fetchJSON("/v1/artifacts/" + encodeURIComponent(artifactId) + "/files");
    return Array.isArray(body) ? body : body.items || body.files || [];
  }

  function fileHref(artifactId, path) {
    return "/v1/artifacts/" + encodeURIComponent(artifactId) + "/files/" + path.split("/").map(encodeURIComponent).join("/");
  }

  // The same words as the server-rendered page: the server owns what each runtime's command is.
  function loadHow(a, how) {
    if (!how || !how.length) return null;
    return el("details", { class: "load-how", id: "load-" + a.id },
      el("summary", {}, "How to load " + a.format, a.hub_url ? null : [" (download the files into ", el("code", {}, "./" + a.id), " first)"]),
      how.flatMap((h) => [el("p", { class: "small" }, "With " + h.runtime + ":"), el("pre", { class: "mono small" }, el("code", {}, h.code))]));
  }

  async function renderArtifacts(j) {
    const box = $("artifacts");
    if (!j.artifacts.length) return;
    let loads = {};
    try { loads = await fetchJSON("/jobs/" + encodeURIComponent(j.id) + "/loads"); } catch (err) { loads = {}; }
    const blocks = await Promise.all(j.artifacts.map(async (a) => {
      let files = [], problem = null;
      try { files = await fileList(a.id); } catch (err) { problem = "Could not list the files: " + err.message; }
      const rows = files.map((f) => el("tr", {},
        el("td", {}, el("a", { href: f.url || fileHref(a.id, f.path), download: true }, f.path)),
        el("td", { class: "num" }, bytes(f.size !== undefined ? f.size : f.size_bytes)),
        el("td", { class: "mono muted sha", title: f.sha256 || "" }, (f.sha256 || "").slice(0, 12))));
      return el("div", { class: "artifact" },
        el("p", { class: "artifact-head" }, el("strong", {}, a.kind), " · " + a.format + " · " + a.files + " files · " + bytes(a.size_bytes),
          a.hub_url ? [" · ", el("a", { href: a.hub_url, rel: "noopener" }, "View on the Hub")] : null),
        a.location ? el("p", { class: "muted small mono" }, a.location) : null,
        problem ? el("p", { class: "field-error" }, problem) : el("div", { class: "table-wrap" }, el("table", { class: "files" },
          el("caption", { class: "sr-only" }, "Files of artifact " + a.id),
          el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "File"), el("th", { scope: "col", class: "num" }, "Size"), el("th", { scope: "col", class: "sha" }, "sha256"))),
          el("tbody", {}, rows))),
        loadHow(a, loads[a.id]));
    }));
    box.replaceChildren(...blocks);
  }

  function renderMetrics(j) {
    const mt = j.metrics || {};
    const charts = [];
    if (typeof mt.perplexity_after === "number" && typeof mt.perplexity_before === "number") {
      charts.push(["Perplexity", mt.perplexity_before, mt.perplexity_after, (v) => v.toFixed(2), "lower is better"]);
    }
    if (typeof mt.size_bytes_after === "number" && typeof mt.size_bytes_before === "number") {
      const ratio = mt.size_bytes_after ? (mt.size_bytes_before / mt.size_bytes_after).toFixed(1) + "× smaller" : "";
      charts.push(["Size", mt.size_bytes_before, mt.size_bytes_after, bytes, ratio]);
    }
    // The grid puts charts side by side from 240 px each; draw each at the width it will get.
    const box = $("metric-charts"), gap = 16, full = $("metrics").clientWidth || 600;
    const cols = Math.max(1, Math.min(charts.length, Math.floor((full + gap) / (240 + gap))));
    const colWidth = (full - gap * (cols - 1)) / cols;
    box.replaceChildren(...charts.map((args) => window.QFCharts.beforeAfter(...args, colWidth)));
    if (!charts.length) return;
    const rows = [];
    if (typeof mt.perplexity_after === "number") rows.push(["Perplexity", mt.perplexity_before.toFixed(3), mt.perplexity_after.toFixed(3)]);
    if (typeof mt.size_bytes_after === "number") rows.push(["Size", bytes(mt.size_bytes_before), bytes(mt.size_bytes_after)]);
    const times = [["Total time", mt.seconds], ["quantizing", mt.quantize_seconds], ["evaluating", mt.evaluate_seconds]].filter(([, v]) => typeof v === "number");
    $("metrics").replaceChildren(
      el("table", { class: "metrics" }, el("caption", { class: "sr-only" }, "Before and after quantization"),
        el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Metric"), el("th", { scope: "col", class: "num" }, "Before"), el("th", { scope: "col", class: "num" }, "After"))),
        el("tbody", {}, rows.map(([n, b, a]) => el("tr", {}, el("th", { scope: "row" }, n), el("td", { class: "num" }, b), el("td", { class: "num" }, a))))),
      times.length ? el("p", { class: "muted small" }, times.map(([n, v]) => n + " " + seconds(v)).join("; ") + ".") : "");
  }

  function renderLosses(j) {
    const losses = j.metrics && j.metrics.layer_losses && Object.keys(j.metrics.layer_losses).length ? j.metrics.layer_losses : liveLosses;
    const key = j.status + JSON.stringify(losses);
    if (key === shownLosses) return;  // redrawing would close an opened "Show the numbers"
    shownLosses = key;
    const fig = window.QFCharts.layerLosses(losses, $("loss-chart").clientWidth, j.progress && j.progress.layers_total);
    const msg = TERMINAL.includes(j.status) ? "No per-layer loss was recorded for this job."
      : "Appears as layers finish, for methods that record a per-layer loss.";
    $("loss-chart").replaceChildren(fig || el("p", { class: "muted" }, msg));
  }

  function apply(j) {
    job = j;
    renderHeader(j); renderProgress(j); renderFacts(j);
    const a = JSON.stringify(j.artifacts), m = JSON.stringify(j.metrics);
    if (a !== shownArtifacts) { shownArtifacts = a; renderArtifacts(j); }
    if (m !== shownMetrics) { shownMetrics = m; renderMetrics(j); }
    renderLosses(j);
  }

  async function tick() {
    timer = null;
    try {
      const [j, ev] = await Promise.all([
        fetchJSON("/v1/jobs/" + encodeURIComponent(job.id)),
        fetchJSON("/v1/jobs/" + encodeURIComponent(job.id) + "/events?after=" + lastEvent),
      ]);
      renderEvents(ev.items || []);
      apply(j);
      failures = 0;
      $("action-msg").dataset.poll === "lost" && setMessage("");
    } catch (err) {
      failures += 1;
      setMessage("Lost contact with the server (" + err.message + "); retrying…", "lost");
    }
    if (!TERMINAL.includes(job.status)) schedule(Math.min(POLL_MS * (1 + failures), 10000));
    else finalEvents();
  }

  // The job and its events are fetched side by side; pick up the closing events once more.
  async function finalEvents() {
    try {
      const ev = await fetchJSON("/v1/jobs/" + encodeURIComponent(job.id) + "/events?after=" + lastEvent);
      renderEvents(ev.items || []);
    } catch (err) { /* the page already shows the final state */ }
  }

  function schedule(ms) { if (!timer) timer = setTimeout(tick, ms); }

  function setMessage(text, tag) {
    const m = $("action-msg");
    m.textContent = text;
    m.dataset.poll = tag || "";
  }

  // Cancel and Retry call the JSON API; the forms post to the page only without scripts.
  for (const form of document.querySelectorAll("#job-actions form")) {
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const action = form.dataset.action;
      const btn = form.querySelector("button");
      btn.disabled = true;
      try {
        const j = await fetchJSON("/v1/jobs/" + encodeURIComponent(job.id) + "/" + action, { method: "POST" });
        setMessage(action === "cancel"
          ? (j.status === "cancelled" ? "Cancelled." : "Cancel requested; the job stops within seconds.")
          : "Queued again as attempt " + j.attempt + "; it resumes from its checkpoints.");
        apply(j);
      } catch (err) {
        setMessage((action === "cancel" ? "Could not cancel: " : "Could not retry: ") + err.message);
        btn.disabled = false;
      }
      schedule(200);
    });
  }

  for (const e of data.events) collectLosses(e);
  renderMetrics(job);
  renderLosses(job);
  if (!TERMINAL.includes(job.status)) schedule(POLL_MS);
  window.QFJobPage = { get job() { return job; }, localTime };
})();
