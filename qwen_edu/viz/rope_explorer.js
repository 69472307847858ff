// RoPE explorer: the math and the drawing, in the browser.
// It computes everything client-side so that the same widget is interactive in Jupyter, Colab and
// the static book (where no Python kernel runs). The formulas mirror qwen_edu's Python ones; the
// tests evaluate QwenRope.invFreq in headless Chromium and compare with the Python reference.
(function () {
  if (window.QwenRope && window.QwenRope.version === "2") return;

  const METHODS = {
    none: "plain RoPE",
    linear: "position interpolation (linear)",
    ntk: "NTK-aware (static base scaling)",
    dynamic: "dynamic NTK (transformers)",
    qwen1_ntk: "dynamic NTK (Qwen-1, alpha)",
    yarn: "YaRN",
  };

  function baseInvFreq(base, dim) {
    const out = [];
    for (let j = 0; j < dim / 2; j++) out.push(1 / Math.pow(base, (2 * j) / dim));
    return out;
  }

  // Returns {invFreq: number[], attentionScaling: number} for one method.
  // p: {base, dim, method, factor, originalMax, seqLen, betaFast, betaSlow}
  function invFreq(p) {
    const dim = p.dim, base = p.base, factor = p.factor;
    if (dim % 2 !== 0 || dim <= 2) throw new Error("head dimension must be even and > 2, got " + dim);
    if (p.method !== "none" && !(factor >= 1)) throw new Error("scaling factor must be >= 1, got " + factor);
    switch (p.method) {
      case "none":
        return { invFreq: baseInvFreq(base, dim), attentionScaling: 1 };
      case "linear":
        return { invFreq: baseInvFreq(base, dim).map((f) => f / factor), attentionScaling: 1 };
      case "ntk": {
        const newBase = base * Math.pow(factor, dim / (dim - 2));
        return { invFreq: baseInvFreq(newBase, dim), attentionScaling: 1 };
      }
      case "dynamic": {
        const seq = Math.max(p.seqLen, p.originalMax);
        if (p.seqLen <= p.originalMax) return { invFreq: baseInvFreq(base, dim), attentionScaling: 1 };
        const newBase = base * Math.pow((factor * seq) / p.originalMax - (factor - 1), dim / (dim - 2));
        return { invFreq: baseInvFreq(newBase, dim), attentionScaling: 1 };
      }
      case "qwen1_ntk": {
        const ratio = p.seqLen / p.originalMax;
        const alpha = Math.max(Math.pow(2, Math.ceil(Math.log2(ratio) + 1)) - 1, 1);
        const newBase = base * Math.pow(alpha, dim / (dim - 2));
        return { invFreq: baseInvFreq(newBase, dim), attentionScaling: 1, alpha: alpha };
      }
      case "yarn": {
        const betaFast = p.betaFast ?? 32, betaSlow = p.betaSlow ?? 1;
        const corr = (r) => (dim * Math.log(p.originalMax / (r * 2 * Math.PI))) / (2 * Math.log(base));
        let low = Math.max(Math.floor(corr(betaFast)), 0);
        let high = Math.min(Math.ceil(corr(betaSlow)), dim - 1);
        if (low === high) high += 0.001;
        const out = [];
        for (let j = 0; j < dim / 2; j++) {
          const posFreq = Math.pow(base, (2 * j) / dim);
          const extrapolated = 1 / posFreq, interpolated = 1 / (factor * posFreq);
          const ramp = Math.min(Math.max((j - low) / (high - low), 0), 1);
          out.push(interpolated * ramp + extrapolated * (1 - ramp));
        }
        const scaling = factor <= 1 ? 1 : 0.1 * Math.log(factor) + 1;
        return { invFreq: out, attentionScaling: scaling };
      }
      default:
        throw new Error("unknown scaling method " + p.method);
    }
  }

  // Mean of cos(distance * theta_i), times scaling^2: the q.k score of two identical all-ones
  // vectors, normalised so that distance 0 scores attentionScaling^2. With binWidth > 1 each point
  // is the average over the integer distances of its bin (at most 64 samples), which removes the
  // aliasing that sampling a fast oscillation at a few hundred points would cause.
  function decayCurve(freqs, scaling, distances, binWidth) {
    const score = (d) => {
      let s = 0;
      for (const f of freqs) s += Math.cos(d * f);
      return (s / freqs.length) * scaling * scaling;
    };
    const width = Math.max(1, Math.floor(binWidth || 1));
    return distances.map((d) => {
      if (width === 1) return score(d);
      const step = Math.max(1, Math.floor(width / 64));
      let total = 0, n = 0;
      for (let k = 0; k < width; k += step) { total += score(d + k); n++; }
      return total / n;
    });
  }

  // ---- drawing -------------------------------------------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  function el(tag, attrs, parent) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function text(parent, x, y, s, extra) {
    const t = el("text", Object.assign({ x: x, y: y, "font-size": 11, fill: "#333" }, extra || {}), parent);
    t.textContent = s;
    return t;
  }
  function polyline(points) {
    return points.map((pt) => pt[0].toFixed(2) + "," + pt[1].toFixed(2)).join(" ");
  }

  function drawDials(svg, freqs, position, x0, y0, w) {
    const n = Math.min(16, freqs.length), cols = 8, r = 18, gap = w / cols;
    text(svg, x0, y0 - 8, "Rotation of dimension pairs at position " + position + " (angle = position x theta_i)", { "font-weight": "bold" });
    for (let k = 0; k < n; k++) {
      const i = Math.round((k * (freqs.length - 1)) / Math.max(n - 1, 1));
      const cx = x0 + gap * (k % cols) + gap / 2, cy = y0 + 28 + Math.floor(k / cols) * 62;
      el("circle", { cx: cx, cy: cy, r: r, fill: "#f4f7fb", stroke: "#9fb3c8" }, svg);
      const angle = (position * freqs[i]) % (2 * Math.PI);
      el("line", { x1: cx, y1: cy, x2: cx + r * Math.cos(angle), y2: cy - r * Math.sin(angle), stroke: "#c0392b", "stroke-width": 2, class: "dial-hand", "data-pair": i }, svg);
      text(svg, cx - 10, cy + r + 12, "i=" + i, { "font-size": 9 });
    }
  }

  function drawLinePlot(parent, opts) {
    const { x0, y0, w, h, series, xs, title, xLabel, yLabel, hlines, logY } = opts;
    const svg = el("g", { class: "plot" }, parent);
    el("rect", { x: x0, y: y0, width: w, height: h, fill: "white", stroke: "#ccc" }, svg);
    text(svg, x0, y0 - 8, title, { "font-weight": "bold", class: "plot-title" });
    const tf = (v) => (logY ? Math.log10(v) : v);
    let lo = Infinity, hi = -Infinity;
    for (const s of series) for (const v of s.ys) { lo = Math.min(lo, tf(v)); hi = Math.max(hi, tf(v)); }
    for (const hl of hlines || []) { lo = Math.min(lo, tf(hl.y)); hi = Math.max(hi, tf(hl.y)); }
    if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
    const xmin = xs[0], xmax = xs[xs.length - 1];
    const X = (v) => x0 + ((v - xmin) / (xmax - xmin || 1)) * w;
    const Y = (v) => y0 + h - ((tf(v) - lo) / (hi - lo)) * h;
    for (const hl of hlines || []) {
      el("line", { x1: x0, x2: x0 + w, y1: Y(hl.y), y2: Y(hl.y), stroke: hl.color, "stroke-dasharray": "4 3" }, svg);
    }
    // Each line's label sits just above its line, inside the frame. A line at the top edge gets its
    // label below it (above, it would run into the title), and a label that would land on another
    // one (two lines at the same height) moves down a row.
    const row = 12, placed = [];
    (hlines || []).map((hl) => ({ hl: hl, y: Y(hl.y) })).sort((a, b) => a.y - b.y).forEach(({ hl, y }) => {
      let baseline = y - 3 < y0 + row ? y + row : y - 3;
      for (const other of placed) if (Math.abs(baseline - other) < row) baseline = other + row;
      placed.push(baseline);
      text(svg, x0 + 4, baseline, hl.label, { fill: hl.color, "font-size": 10, class: "line-label" });
    });
    for (const s of series) {
      el("polyline", { points: polyline(xs.map((x, k) => [X(x), Y(s.ys[k])])), fill: "none", stroke: s.color, "stroke-width": s.width || 1.6, class: s.cls || "" }, svg);
    }
    let lx = x0 + w - 170;
    series.forEach((s, k) => {
      el("line", { x1: lx, x2: lx + 18, y1: y0 + 12 + 14 * k, y2: y0 + 12 + 14 * k, stroke: s.color, "stroke-width": 2 }, svg);
      text(svg, lx + 22, y0 + 16 + 14 * k, s.label, { "font-size": 10, class: "legend-label" });
    });
    text(svg, x0 + w / 2 - 40, y0 + h + 28, xLabel);
    text(svg, x0 - 4, y0 + h + 14, String(xmin), { "font-size": 9 });
    text(svg, x0 + w - 20, y0 + h + 14, String(Math.round(xmax)), { "font-size": 9 });
    const fmt = (v) => (logY ? Math.round(Math.pow(10, v)).toExponential(1) : v.toFixed(2));
    text(svg, x0 - 46, y0 + 10, fmt(hi), { "font-size": 9 });
    text(svg, x0 - 46, y0 + h, fmt(lo), { "font-size": 9 });
    text(svg, x0 - 46, y0 + h / 2, yLabel, { "font-size": 10 });
  }

  function render(root, state) {
    const svg = root.querySelector("svg");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const status = root.querySelector(".qr-status");
    let scaled, plain;
    try {
      const params = { base: state.base, dim: state.dim, method: state.method, factor: state.factor,
                       originalMax: state.originalMax, seqLen: state.position + 1 };
      scaled = invFreq(params);
      plain = invFreq(Object.assign({}, params, { method: "none" }));
      status.textContent = "";
    } catch (e) {
      status.textContent = "Error: " + e.message;
      return;
    }
    drawDials(svg, scaled.invFreq, state.position, 60, 30, 640);
    const pairs = scaled.invFreq.map((_, i) => i);
    // With plain RoPE the "scaled" curve is the plain one: draw it once, under its one name.
    const isPlain = state.method === "none";
    const withPlain = (plainSeries, scaledSeries) => (isPlain ? [scaledSeries] : [plainSeries, scaledSeries]);
    drawLinePlot(svg, {
      x0: 60, y0: 190, w: 640, h: 170, xs: pairs, logY: true,
      title: "Wavelength 2*pi/theta_i of each pair (tokens, log scale)",
      xLabel: "pair index i", yLabel: "tokens",
      series: withPlain(
        { ys: plain.invFreq.map((f) => (2 * Math.PI) / f), color: "#999", label: METHODS.none },
        { ys: scaled.invFreq.map((f) => (2 * Math.PI) / f), color: "#1f6fb2", label: METHODS[state.method], cls: "scaled-wavelength" },
      ),
      hlines: [
        { y: state.originalMax, color: "#2e8b57", label: "training context " + state.originalMax },
        { y: state.originalMax * state.factor, color: "#c0392b", label: "target " + Math.round(state.originalMax * state.factor) },
      ],
    });
    const maxDistance = Math.round(state.originalMax * Math.max(state.factor, 1) * 1.25);
    const distances = [];
    const binWidth = Math.max(1, Math.floor(maxDistance / 300));
    for (let k = 0; k < 300; k++) distances.push(k * binWidth);
    drawLinePlot(svg, {
      x0: 60, y0: 420, w: 640, h: 170, xs: distances,
      title: "Score of two identical all-ones vectors vs their distance (mean cos, averaged per bin)",
      xLabel: "relative distance (tokens)", yLabel: "score",
      series: withPlain(
        { ys: decayCurve(plain.invFreq, 1, distances, binWidth), color: "#999", label: METHODS.none, width: 1 },
        { ys: decayCurve(scaled.invFreq, scaled.attentionScaling, distances, binWidth), color: "#1f6fb2", label: METHODS[state.method], cls: "scaled-decay" },
      ),
      hlines: [],
    });
    const extra = scaled.alpha !== undefined ? ", alpha " + scaled.alpha : "";
    root.querySelector(".qr-summary").textContent =
      "lowest frequency theta_" + (scaled.invFreq.length - 1) + " = " + scaled.invFreq[scaled.invFreq.length - 1].toExponential(3) +
      ", attention scaling " + scaled.attentionScaling.toFixed(4) + extra;
  }

  function control(root, label, input) {
    const wrap = document.createElement("label");
    wrap.style.cssText = "display:inline-flex;align-items:center;gap:4px;margin:2px 10px 2px 0;font:12px sans-serif";
    wrap.appendChild(document.createTextNode(label));
    wrap.appendChild(input);
    root.querySelector(".qr-controls").appendChild(wrap);
    return input;
  }

  function mount(root, initial) {
    const state = Object.assign({}, initial);
    root.innerHTML =
      '<div class="qr-controls" style="margin-bottom:6px"></div>' +
      '<div class="qr-summary" style="font:12px monospace;color:#444"></div>' +
      '<div class="qr-status" style="font:12px sans-serif;color:#c0392b"></div>' +
      '<svg xmlns="http://www.w3.org/2000/svg" width="740" height="630" style="max-width:100%;height:auto" viewBox="0 0 740 630"></svg>';
    const slider = (name, label, min, max, step, toValue, fromValue) => {
      const input = document.createElement("input");
      input.type = "range"; input.min = min; input.max = max; input.step = step; input.name = name;
      input.value = fromValue(state[name]);
      const out = document.createElement("span");
      out.style.cssText = "min-width:52px;font-family:monospace";
      out.textContent = state[name];
      input.addEventListener("input", () => { state[name] = toValue(+input.value); out.textContent = state[name]; render(root, state); });
      control(root, label, input).after(out);
    };
    slider("base", "base", 3, 7, 0.25, (v) => Math.round(Math.pow(10, v)), (b) => Math.log10(b));
    const dim = document.createElement("select");
    dim.name = "dim";
    [16, 32, 64, 96, 128, 256].forEach((d) => { const o = document.createElement("option"); o.value = d; o.textContent = d; dim.appendChild(o); });
    dim.value = state.dim;
    dim.addEventListener("change", () => { state.dim = +dim.value; render(root, state); });
    control(root, "head dim", dim);
    slider("position", "position", 0, 32768, 1, (v) => v, (v) => v);
    const method = document.createElement("select");
    method.name = "method";
    Object.keys(METHODS).forEach((m) => { const o = document.createElement("option"); o.value = m; o.textContent = METHODS[m]; method.appendChild(o); });
    method.value = state.method;
    method.addEventListener("change", () => { state.method = method.value; render(root, state); });
    control(root, "method", method);
    slider("factor", "factor", 1, 32, 0.5, (v) => v, (v) => v);
    slider("originalMax", "training context", 256, 32768, 256, (v) => v, (v) => v);
    render(root, state);
    root.qwenRopeState = state;
    return state;
  }

  window.QwenRope = { version: "2", METHODS: METHODS, invFreq: invFreq, decayCurve: decayCurve, mount: mount, render: render };
})();
