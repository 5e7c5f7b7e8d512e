/* Helpers shared by the pages (no framework, no build step). */
"use strict";
document.documentElement.classList.add("js");

window.QF = (function () {
  const TERMINAL = ["succeeded", "failed", "cancelled"];

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children.flat()) if (c) node.append(c);
    return node;
  }

  function seconds(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "–";
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function localTime(iso, withDate) {
    if (!iso) return "–";
    const d = new Date(iso);
    const t = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    return withDate ? d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + t : t;
  }

  function timeEl(iso, withDate) {
    return el("time", { datetime: iso, title: iso }, localTime(iso, withDate));
  }

  function badge(status, cancelRequested) {
    return el("span", { class: "badge badge-" + status, "data-status-badge": true },
      el("span", { class: "dot", "aria-hidden": "true" }),
      status + (cancelRequested && status === "running" ? " · cancelling" : ""));
  }

  async function fetchJSON(url, options) {
    const resp = await fetch(url, Object.assign({ headers: { Accept: "application/json" }, cache: "no-store" }, options || {}));
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const err = new Error((body && body.message) || resp.status + " " + resp.statusText);
      err.status = resp.status; err.body = body;
      throw err;
    }
    return body;
  }

  // Show server-rendered UTC times in the reader's time zone.
  function localizeTimes(root) {
    for (const t of (root || document).querySelectorAll("time[datetime]")) {
      const iso = t.getAttribute("datetime");
      if (!iso || t.dataset.localized) continue;
      t.title = iso;
      t.textContent = localTime(iso, !t.closest(".timeline"));
      t.dataset.localized = "1";
    }
  }

  document.addEventListener("DOMContentLoaded", () => localizeTimes(document));
  return { TERMINAL, el, svg, seconds, bytes, localTime, timeEl, badge, fetchJSON, localizeTimes };
})();
