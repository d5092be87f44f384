// dsft ui: small SVG line charts, no dependencies. dsftPlot.lineChart(element, series, options)
"use strict";
(function () {
  const PALETTE = ["#2456d3", "#ee46bc", "#12b76a", "#f79009", "#7a5af8", "#06aed4", "#c62828", "#667085"];

  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-2) return v.toExponential(1);
    return Number(v.toPrecision(3)).toString();
  }

  function ticks(lo, hi, n) {
    if (hi === lo) { hi = lo + (Math.abs(lo) || 1) * 0.1; lo = lo - (Math.abs(lo) || 1) * 0.1; }
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
    return {lo: Math.min(lo, out[0]), hi: Math.max(hi, out[out.length - 1]), ticks: out};
  }

  function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }

  // series: [{name, points: [[x, y], ...], color}]; options: {xLabel, empty}
  function lineChart(el, series, options) {
    const opts = options || {};
    const W = el.clientWidth || 420, H = el.clientHeight || 230, m = {l: 52, r: 10, t: 8, b: 34};
    const pts = series.flatMap(s => s.points).filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    if (!pts.length) {
      el.innerHTML = `<svg viewBox="0 0 ${W} ${H}"><text x="${W / 2}" y="${H / 2}" text-anchor="middle" fill="#98a2b3" font-size="12">${esc(opts.empty || "no data yet")}</text></svg>`;
      return;
    }
    const xs = ticks(Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0])), 6);
    const ys = ticks(Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1])), 4);
    const X = x => m.l + (x - xs.lo) / (xs.hi - xs.lo) * (W - m.l - m.r);
    const Y = y => H - m.b - (y - ys.lo) / (ys.hi - ys.lo) * (H - m.t - m.b);
    let svg = `<svg viewBox="0 0 ${W} ${H}" font-size="11" font-family="inherit">`;
    for (const t of ys.ticks) {
      svg += `<line x1="${m.l}" x2="${W - m.r}" y1="${Y(t)}" y2="${Y(t)}" stroke="#eef0f3"/>`;
      svg += `<text x="${m.l - 5}" y="${Y(t) + 4}" text-anchor="end" fill="#667085">${fmt(t)}</text>`;
    }
    for (const t of xs.ticks) svg += `<text x="${X(t)}" y="${H - m.b + 14}" text-anchor="middle" fill="#667085">${fmt(t)}</text>`;
    svg += `<line x1="${m.l}" x2="${W - m.r}" y1="${H - m.b}" y2="${H - m.b}" stroke="#98a2b3"/>`;
    svg += `<text x="${(W + m.l) / 2}" y="${H - 4}" text-anchor="middle" fill="#667085">${esc(opts.xLabel || "step")}</text>`;
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      const p = s.points.filter(q => Number.isFinite(q[0]) && Number.isFinite(q[1]));
      if (!p.length) return;
      svg += `<polyline class="series" data-name="${esc(s.name)}" data-n="${p.length}" fill="none" stroke="${color}" stroke-width="1.6" points="${p.map(q => X(q[0]).toFixed(1) + "," + Y(q[1]).toFixed(1)).join(" ")}"/>`;
      if (p.length < 40) for (const q of p) svg += `<circle cx="${X(q[0])}" cy="${Y(q[1])}" r="2" fill="${color}"/>`;
    });
    if (series.length > 1) {
      series.forEach((s, i) => {
        const color = s.color || PALETTE[i % PALETTE.length];
        svg += `<rect x="${m.l + 8}" y="${m.t + 4 + i * 14}" width="9" height="9" fill="${color}"/><text x="${m.l + 21}" y="${m.t + 12 + i * 14}" fill="#344054">${esc(s.name)}</text>`;
      });
    }
    el.innerHTML = svg + "</svg>";
  }

  // log.jsonl records → {loss, lr, grad, eval: {metric: points}} keyed by step (a resumed run overwrites its steps)
  function curvesFrom(records) {
    const steps = new Map(), evals = {};
    for (const r of records) {
      if (!r || typeof r.step !== "number") continue;
      if (r.event === "eval") {
        for (const [k, v] of Object.entries(r)) {
          if (k === "step" || k === "event" || typeof v !== "number") continue;
          (evals[k] = evals[k] || new Map()).set(r.step, v);
        }
      } else if (!r.event && typeof r.loss === "number") steps.set(r.step, r);
    }
    const ordered = [...steps.values()].sort((a, b) => a.step - b.step);
    return {
      loss: ordered.map(r => [r.step, r.loss]), lr: ordered.map(r => [r.step, r.lr]),
      grad: ordered.map(r => [r.step, r.grad_norm]),
      eval: Object.fromEntries(Object.entries(evals).map(([k, m]) => [k, [...m.entries()].sort((a, b) => a[0] - b[0])])),
      last: ordered.length ? ordered[ordered.length - 1] : null,
    };
  }

  window.dsftPlot = {lineChart, curvesFrom, PALETTE, esc};
})();
