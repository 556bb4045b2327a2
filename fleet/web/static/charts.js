/* SparseFleet dashboard charts: hand-drawn SVG (no chart library, nothing vendored).
 *
 * SFCharts.line(svg, series, opts): series = [{name, points: [[x, y], ...]}], one colour each;
 *   up to MAX_MARKED points a series marks each as <circle class="point"> with a <title>
 *   tooltip; a longer series is drawn as its line only (each marker is DOM the page redraws).
 * SFCharts.bars(svg, xs, stacks, opts): stacked bars, stacks = [{name, values: [...]}] aligned
 *   with xs.
 * opts: {xLabel, yLabel, yMin, yMax, xFormat, yFormat}. Empty data draws "no data yet".
 * A chart whose data and width did not change since its last drawing is left as it is (a live
 * page redraws often; most redraws of a finished chart would change nothing).
 */
"use strict";
(function (global) {
  const NS = "http://www.w3.org/2000/svg";
  const H = 250, M = { l: 58, r: 14, t: 22, b: 38 };
  const MAX_MARKED = 60; // points per series drawn as markers with a tooltip; longer: a line
  let W = 640; // set by reset() to the element's width, so text keeps its size on wide figures

  function el(name, attrs, parent, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  // Widths are measured once per chart and window size: reading one forces a layout.
  const widths = new WeakMap(); // element -> {resized, w (px)}
  let resized = 0;
  window.addEventListener("resize", () => { resized += 1; });

  /* False when the chart already shows exactly this; else clears it for drawing. */
  function reset(svg, data) {
    const key = `${resized}|${JSON.stringify(data)}`;
    if (svg.__sfKey === key) return false;
    svg.__sfKey = key;
    const cached = widths.get(svg);
    if (cached === undefined || cached.resized !== resized) {
      const w = Math.max(320, Math.round(svg.getBoundingClientRect().width || 640));
      widths.set(svg, { resized, w });
    }
    W = widths.get(svg).w;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
    return true;
  }

  function points(svg) { return svg.querySelectorAll(".point, .bar").length; }

  function ticks(min, max, count) {
    if (!(max > min)) { max = min + 1; }
    const raw = (max - min) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return out;
  }

  function plain(v) {
    if (Math.abs(v) >= 1000) return v.toFixed(0);
    return String(Math.round(v * 1000) / 1000);
  }

  function empty(svg, message) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg,
      message || "no data yet");
  }

  /* Axes, grid and labels; returns the x and y scales. */
  function frame(svg, xMin, xMax, yMin, yMax, opts) {
    const xf = opts.xFormat || plain, yf = opts.yFormat || plain;
    const sx = (x) => M.l + ((x - xMin) / (xMax - xMin || 1)) * (W - M.l - M.r);
    const sy = (y) => H - M.b - ((y - yMin) / (yMax - yMin || 1)) * (H - M.t - M.b);
    const axis = el("g", { class: "axis" }, svg);
    el("line", { x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b }, axis);
    el("line", { x1: M.l, y1: M.t, x2: M.l, y2: H - M.b }, axis);
    for (const y of ticks(yMin, yMax, 4)) {
      el("line", { class: "grid", x1: M.l, x2: W - M.r, y1: sy(y), y2: sy(y) }, svg);
      el("text", { x: M.l - 6, y: sy(y) + 4, "text-anchor": "end" }, svg, yf(y));
    }
    const xt = opts.integerX ? ticks(xMin, xMax, 6).filter((x) => Number.isInteger(x))
      : ticks(xMin, xMax, 6);
    for (const x of xt) {
      el("text", { x: sx(x), y: H - M.b + 15, "text-anchor": "middle" }, svg, xf(x));
    }
    if (opts.xLabel) {
      el("text", { x: (M.l + W - M.r) / 2, y: H - 4, "text-anchor": "middle" }, svg, opts.xLabel);
    }
    if (opts.yLabel) {
      el("text", { x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
        transform: `rotate(-90 12 ${(M.t + H - M.b) / 2})` }, svg, opts.yLabel);
    }
    return { sx, sy };
  }

  function legend(svg, names) {
    let x = M.l + 4;
    names.forEach((name, i) => {
      el("rect", { x, y: 5, width: 10, height: 10, class: `f${i % 8}` }, svg);
      const label = el("text", { x: x + 14, y: 14 }, svg, name);
      x += 24 + Math.max(40, name.length * 6.2);
      label.setAttribute("data-series", String(i));
    });
  }

  function extent(values, lo, hi) {
    let min = lo !== undefined ? lo : Math.min(...values);
    let max = hi !== undefined ? hi : Math.max(...values);
    if (!(max > min)) { max = min + (Math.abs(min) || 1); }
    return [min, max];
  }

  function line(svg, series, opts) {
    opts = opts || {};
    if (!reset(svg, [series, opts.yMin, opts.yMax])) return points(svg);
    const drawn = series.filter((s) => s.points.length > 0);
    if (drawn.length === 0) { empty(svg, opts.emptyText); return 0; }
    const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
    const ys = drawn.flatMap((s) => s.points.map((p) => p[1]));
    const [xMin, xMax] = extent(xs);
    const [yMin, yMax] = extent(ys, opts.yMin, opts.yMax);
    const { sx, sy } = frame(svg, xMin, xMax, yMin, yMax, opts);
    const xf = opts.xFormat || plain, yf = opts.yFormat || plain;
    let count = 0;
    series.forEach((s, i) => {
      if (s.points.length === 0) return;
      const cls = i % 8;
      const g = el("g", { class: "series", "data-name": s.name }, svg);
      el("polyline", { class: `line s${cls}`,
        points: s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }, g);
      if (s.points.length > MAX_MARKED) { // a long series is its line: no marker per point
        el("title", {}, g.firstChild, s.name);
        return;
      }
      const radius = 3;
      for (const p of s.points) {
        const c = el("circle", { class: `point f${cls}`, cx: sx(p[0]).toFixed(1),
          cy: sy(p[1]).toFixed(1), r: radius }, g);
        el("title", {}, c, `${s.name}: ${yf(p[1])} at ${opts.xLabel || "x"} ${xf(p[0])}`);
        count += 1;
      }
    });
    legend(svg, series.map((s) => s.name));
    return count;
  }

  function bars(svg, xs, stacks, opts) {
    opts = opts || {};
    if (!reset(svg, [xs, stacks])) return points(svg);
    if (xs.length === 0) { empty(svg, opts.emptyText); return 0; }
    const totals = xs.map((_, i) => stacks.reduce((sum, s) => sum + (s.values[i] || 0), 0));
    const [yMin, yMax] = extent(totals, 0, Math.max(1, ...totals));
    const half = 0.5;
    const { sx, sy } = frame(svg, Math.min(...xs) - half, Math.max(...xs) + half, yMin, yMax,
      Object.assign({ integerX: true }, opts));
    const width = Math.max(1, (sx(xs[0] + 1) - sx(xs[0])) * 0.8);
    let count = 0;
    xs.forEach((x, i) => {
      let base = 0;
      stacks.forEach((s, k) => {
        const v = s.values[i] || 0;
        if (v <= 0) return;
        const r = el("rect", { class: `bar f${k % 8}`, x: (sx(x) - width / 2).toFixed(1),
          y: sy(base + v).toFixed(1), width: width.toFixed(1),
          height: Math.max(0.5, sy(base) - sy(base + v)).toFixed(1) }, svg);
        el("title", {}, r, `${opts.xLabel || "x"} ${x}: ${v} ${s.name}`);
        base += v;
        count += 1;
      });
    });
    legend(svg, stacks.map((s) => s.name));
    return count;
  }

  global.SFCharts = { line, bars };
})(window);
