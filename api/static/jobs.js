/* The jobs list: keep the badges and progress of queued and running jobs current. */
"use strict";
(function () {
  const { TERMINAL, badge, el, seconds, fetchJSON } = window.QF;
  const rows = () => [...document.querySelectorAll("tr[data-job-id]")];
  const active = () => rows().some((r) => !TERMINAL.includes(r.dataset.status));

  async function refresh() {
    // The query the server accepted (it drops a bad status or cursor), not the address bar's.
    const table = document.querySelector("table.jobs");
    const params = new URLSearchParams();
    if (table.dataset.status) params.set("status", table.dataset.status);
    if (table.dataset.cursor) params.set("cursor", table.dataset.cursor);
    params.set("limit", String(Math.min(rows().length + 20, 200)));
    try {
      const body = await fetchJSON("/v1/jobs?" + params.toString());
      const byId = Object.fromEntries(body.items.map((j) => [j.id, j]));
      for (const row of rows()) {
        // A job that left the filtered status is no longer in the page's query; ask for it alone.
        const j = byId[row.dataset.jobId] || (!TERMINAL.includes(row.dataset.status) && await fetchJSON("/v1/jobs/" + row.dataset.jobId));
        if (!j) continue;
        row.dataset.status = j.status;
        const cell = row.querySelector(".status-cell");
        const p = j.progress && j.status === "running" ? el("span", { class: "muted small" }, " " + j.progress.layers_done + "/" + j.progress.layers_total) : null;
        cell.replaceChildren(badge(j.status, j.cancel_requested), p || "");
        if (j.started_at) {
          const end = j.finished_at ? new Date(j.finished_at) : new Date();
          row.querySelector('[data-label="Duration"]').textContent = seconds((end - new Date(j.started_at)) / 1000);
        }
      }
    } catch (err) { /* keep the last shown state; the next round tries again */ }
    if (active()) setTimeout(refresh, 2000);
  }

  if (active()) setTimeout(refresh, 2000);
})();
