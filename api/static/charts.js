/* Small inline-SVG charts: before/after bars and the per-layer quantization error. */
"use strict";
window.QFCharts = (function () {
  const { el, svg } = window.QF;
  const PALETTE = ["#4f46e5", "#0891b2", "#16a34a", "#ca8a04", "#dc2626", "#9333ea", "#db2777", "#64748b"];

  // Two horizontal bars (before, after) on one scale, with the change written out.
  // ``width`` is the CSS width the chart gets, so its text draws at its real size.
  function beforeAfter(title, before, after, fmt, note, width) {
    const W = Math.round(Math.max(220, Math.min(width || 300, 440))), H = 78, left = 52, right = 70, bar = 20;
    const max = Math.max(before, after) || 1;
    const scale = (v) => Math.max(2, ((W - left - right) * v) / max);
    const row = (y, label, v, cls) => [
      svg("text", { x: left - 8, y: y + bar / 2 + 4, "text-anchor": "end", text: label }),
      svg("rect", { x: left, y, width: scale(v), height: bar, rx: 4, class: cls }, svg("title", { text: label + ": " + fmt(v) })),
      svg("text", { x: left + scale(v) + 6, y: y + bar / 2 + 4, class: "val", text: fmt(v) }),
    ];
    const change = before ? ((after - before) / before) * 100 : 0;
    const pct = (change >= 0 ? "+" : "−") + Math.abs(change).toFixed(Math.abs(change) < 1 ? 2 : 1) + "%";
    const label = title + ": before " + fmt(before) + ", after " + fmt(after) + " (" + pct + ")";
    const chart = svg("svg", { class: "chart-svg", viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": label },
      svg("line", { x1: left, x2: left, y1: 4, y2: H - 6, class: "axis" }),
      row(8, "Before", before, "bar-before"),
      row(8 + bar + 14, "After", after, "bar-after"));
    return el("figure", { class: "chart", "data-chart": title.toLowerCase() },
      el("figcaption", {}, title, " ", el("span", { class: "muted small" }, pct + (note ? " · " + note : ""))),
      chart);
  }

  // Turn {"0": {"self_attn.q_proj": loss, ...}, ...} into series per sub-module.
  function seriesOf(losses) {
    const layers = Object.keys(losses).map(Number).filter((n) => !Number.isNaN(n)).sort((a, b) => a - b);
    const names = [];
    for (const i of layers) for (const name of Object.keys(losses[i] || losses[String(i)] || {})) if (!names.includes(name)) names.push(name);
    return { layers, names };
  }

  // One line per sub-module across layers, on a log scale (losses span orders of magnitude).
  // ``total`` (layers in the model) fixes the x axis while a job is still running.
  function layerLosses(losses, width, total) {
    const { layers, names } = seriesOf(losses || {});
    const values = [];
    for (const i of layers) for (const n of names) {
      const v = (losses[String(i)] || {})[n];
      if (typeof v === "number" && v > 0) values.push(v);
    }
    if (!layers.length || !values.length) return null;
    const W = Math.round(Math.max(300, Math.min(width || 640, 960))), H = W < 500 ? 220 : 260, L = 44, R = 12, T = 10, B = 34;
    let lo = Math.floor(Math.log10(Math.min(...values))), hi = Math.ceil(Math.log10(Math.max(...values)));
    if (hi === lo) { hi += 1; lo -= 1; }
    const nL = Math.max(Math.max(...layers) + 1, total || 0);
    const x = (i) => L + (nL === 1 ? (W - L - R) / 2 : ((W - L - R) * i) / (nL - 1));
    const y = (v) => T + (H - T - B) * (1 - (Math.log10(v) - lo) / (hi - lo));
    const parts = [];
    // Few decades: label 2× and 5× too, so the reader still gets a scale.
    const mantissas = hi - lo <= 2 ? [1, 2, 5] : [1];
    for (let e = lo; e <= hi; e++) {
      for (const m of mantissas) {
        const v = m * 10 ** e;
        if (v > 10 ** hi) break;
        parts.push(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
        parts.push(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", text: m + "e" + e }));
      }
    }
    const step = Math.max(1, Math.ceil(nL / Math.floor((W - L - R) / 28)));
    for (let i = 0; i < nL; i += step) parts.push(svg("text", { x: x(i), y: H - B + 16, "text-anchor": "middle", text: String(i) }));
    parts.push(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", text: "layer" }));
    parts.push(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }), svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    let worst = null;
    names.forEach((name, k) => {
      const color = PALETTE[k % PALETTE.length];
      const pts = layers.map((i) => [i, (losses[String(i)] || {})[name]]).filter(([, v]) => typeof v === "number" && v > 0);
      if (pts.length > 1) parts.push(svg("polyline", { points: pts.map(([i, v]) => x(i) + "," + y(v)).join(" "), fill: "none", stroke: color, "stroke-width": 2, "stroke-linejoin": "round" }));
      for (const [i, v] of pts) {
        if (!worst || v > worst.v) worst = { i, name, v };
        parts.push(svg("circle", { cx: x(i), cy: y(v), r: 3.5, fill: color }, svg("title", { text: "layer " + i + " · " + name + ": " + v.toPrecision(4) })));
      }
    });
    const label = "Quantization error per layer, log scale, " + layers.length + " layers, " + names.length + " sub-modules; highest: layer " + worst.i + " " + worst.name + " (" + worst.v.toPrecision(3) + ")";
    const chart = svg("svg", { class: "chart-svg", viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": label, "data-layers": layers.length }, parts);
    const legend = el("ul", { class: "legend" }, names.map((n, k) => el("li", {}, el("span", { class: "sw", style: "background:" + PALETTE[k % PALETTE.length], "aria-hidden": "true" }), n)));
    return el("figure", { class: "chart", "data-chart": "layer-losses" }, chart, legend, lossTable(losses, layers, names));
  }

  function lossTable(losses, layers, names) {
    const head = el("tr", {}, el("th", { scope: "col" }, "Layer"), names.map((n) => el("th", { scope: "col", class: "num" }, n)));
    const rows = layers.map((i) => el("tr", {}, el("th", { scope: "row" }, String(i)),
      names.map((n) => { const v = (losses[String(i)] || {})[n]; return el("td", { class: "num" }, typeof v === "number" ? v.toPrecision(4) : "–"); })));
    return el("details", {}, el("summary", {}, "Show the numbers"),
      el("div", { class: "table-wrap" }, el("table", { class: "files" }, el("thead", {}, head), el("tbody", {}, rows))));
  }

  return { beforeAfter, layerLosses };
})();
