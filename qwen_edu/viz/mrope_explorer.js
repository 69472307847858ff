// M-RoPE explorer: Qwen2-VL's (t, h, w) position ids for a prompt you assemble, computed in the browser.
// Everything runs client-side, so the widget stays interactive in Jupyter, Colab and the static book.
// The position rule mirrors qwen_edu.vision.mrope.get_rope_index (Qwen's rope2d.py rule); the tests run
// QwenMrope.ropeIndex and QwenMrope.smartResize under node and in headless Chromium against the Python.
(function (root) {
  if (root.QwenMrope && root.QwenMrope.version === "1") return;

  const STREAMS = ["t", "h", "w"];
  const STREAM_COLORS = ["#d62728", "#2ca02c", "#1f77b4"];
  const KIND_COLORS = { text: "#9e9e9e", start: "#444444", end: "#444444", image: "#6a51a3", video: "#e6550d" };

  // Python's round(): halves go to the even neighbour (2.5 -> 2, 3.5 -> 4).
  function roundHalfEven(x) {
    const f = Math.floor(x), diff = x - f;
    if (diff > 0.5) return f + 1;
    if (diff < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  // smart_resize of qwen_edu.vision.dynamic_resolution, step for step.
  function smartResize(height, width, factor, minPixels, maxPixels) {
    factor = factor || 28; minPixels = minPixels || 56 * 56; maxPixels = maxPixels || 28 * 28 * 1280;
    if (!(height > 0 && width > 0)) throw new Error("image has zero size: " + height + " x " + width);
    const ratio = Math.max(height, width) / Math.min(height, width);
    if (ratio > 200) throw new Error("absolute aspect ratio must be at most 200, got " + ratio.toFixed(1));
    let h = roundHalfEven(height / factor) * factor, w = roundHalfEven(width / factor) * factor;
    if (h * w > maxPixels) {
      const beta = Math.sqrt((height * width) / maxPixels);
      h = Math.max(factor, Math.floor(height / beta / factor) * factor);
      w = Math.max(factor, Math.floor(width / beta / factor) * factor);
    } else if (h * w < minPixels) {
      const beta = Math.sqrt(minPixels / (height * width));
      h = Math.ceil((height * beta) / factor) * factor;
      w = Math.ceil((width * beta) / factor) * factor;
    }
    return [h, w];
  }

  // segments: [{type: "text", length}, {type: "image" | "video", grid: [t, h, w] (patch units)}, ...].
  // Vision items are wrapped in <|vision_start|> ... <|vision_end|> as in a real prompt. Returns per token
  // its kind, its (t, h, w) ids, its 1D id, the item it belongs to (or -1) and its cell on the merged grid.
  function ropeIndex(segments, mergeSize) {
    const m = mergeSize || 2;
    const out = { kind: [], t: [], h: [], w: [], oneD: [], item: [], cell: [] };
    let next = 0, itemNo = 0;
    const push = (kind, t, h, w, item, cell) => {
      out.kind.push(kind); out.t.push(t); out.h.push(h); out.w.push(w);
      out.oneD.push(out.oneD.length); out.item.push(item); out.cell.push(cell);
    };
    const text = (kind) => { push(kind, next, next, next, -1, null); next += 1; };
    for (const seg of segments) {
      if (seg.type === "text") {
        for (let i = 0; i < seg.length; i++) text("text");
        continue;
      }
      const [gt, gh, gw] = seg.grid;
      if (gh % m || gw % m) throw new Error("grid h and w must be multiples of the merge size " + m);
      text("start");
      const H = gh / m, W = gw / m, start = next;
      for (let f = 0; f < gt; f++)
        for (let r = 0; r < H; r++)
          for (let c = 0; c < W; c++) push(seg.type, start + f, start + r, start + c, itemNo, [f, r, c]);
      next = start + Math.max(gt - 1, H - 1, W - 1) + 1;  // Qwen's rule: the largest id so far + 1
      itemNo += 1;
      text("end");
    }
    out.maxId = Math.max(...out.t, ...out.h, ...out.w);
    out.ropeDelta = out.maxId + 1 - out.kind.length;
    return out;
  }

  // Which stream drives each of the head_dim/2 rotary frequencies (0 = t, 1 = h, 2 = w).
  function streamIndex(section, layout) {
    const half = section[0] + section[1] + section[2];
    const idx = [];
    for (let j = 0; j < half; j++) {
      if (layout === "interleaved") {
        idx.push(j % 3 === 1 && j < 3 * section[1] ? 1 : j % 3 === 2 && j < 3 * section[2] ? 2 : 0);
      } else {
        idx.push(j < section[0] ? 0 : j < section[0] + section[1] ? 1 : 2);
      }
    }
    return idx;
  }

  function invFreq(headDim, theta) {
    const out = [];
    for (let j = 0; j < headDim / 2; j++) out.push(1 / Math.pow(theta, (2 * j) / headDim));
    return out;
  }

  // The prompt the controls describe: text, an image, text, a video, text.
  function buildSegments(state) {
    const [ih, iw] = smartResize(state.imageHeight, state.imageWidth);
    const [vh, vw] = smartResize(state.videoHeight, state.videoWidth);
    return [
      { type: "text", length: state.textBefore },
      { type: "image", grid: [1, ih / 14, iw / 14], pixels: [ih, iw] },
      { type: "text", length: state.textBetween },
      { type: "video", grid: [Math.ceil(state.videoFrames / 2), vh / 14, vw / 14], pixels: [vh, vw] },
      { type: "text", length: state.textAfter },
    ];
  }

  // ---- drawing -------------------------------------------------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  function el(tag, attrs, parent) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function label(parent, x, y, s, extra) {
    const t = el("text", Object.assign({ x: x, y: y, "font-size": 11, fill: "#333", "font-family": "sans-serif", "pointer-events": "none" }, extra || {}), parent);
    t.textContent = s;
    return t;
  }
  function shade(color, value, max) {  // the stream colour, light for small ids and full for the largest
    const a = max > 0 ? 0.15 + 0.85 * (value / max) : 1;
    return { fill: color, "fill-opacity": a.toFixed(3) };
  }

  function drawStrip(svg, ids, state, x0, y0, width) {
    const n = ids.kind.length, cw = width / n, rowH = 15;
    label(svg, x0, y0 - 8, "Position ids of every token (click a token to select it)", { "font-weight": "bold" });
    const rows = [["type", null], ["t", 0], ["h", 1], ["w", 2], ["1D", -1]];
    rows.forEach(([name, stream], r) => {
      const y = y0 + r * (rowH + 3);
      label(svg, x0 - 34, y + 11, name, { "font-size": 10 });
      for (let i = 0; i < n; i++) {
        let attrs;
        if (stream === null) attrs = { fill: KIND_COLORS[ids.kind[i]] };
        else if (stream === -1) attrs = shade("#555555", ids.oneD[i], n - 1);
        else attrs = shade(STREAM_COLORS[stream], [ids.t, ids.h, ids.w][stream][i], ids.maxId);
        const rect = el("rect", Object.assign({ x: (x0 + i * cw).toFixed(2), y: y, width: Math.max(cw - 0.3, 0.6).toFixed(2), height: rowH, class: "token-cell", "data-token": i, "data-row": name }, attrs), svg);
        rect.style.cursor = "pointer";
      }
    });
    const sel = Math.min(state.token, n - 1);
    el("rect", { x: (x0 + sel * cw - 1).toFixed(2), y: y0 - 2, width: (cw + 2).toFixed(2), height: 5 * (rowH + 3) + 1, fill: "none", stroke: "#000", "stroke-width": 1.5, class: "selected-token" }, svg);
    // legend
    let lx = x0;
    [["text", "text"], ["start", "vision start / end"], ["image", "image"], ["video", "video"]].forEach(([k, s]) => {
      el("rect", { x: lx, y: y0 + 5 * (rowH + 3) + 4, width: 10, height: 10, fill: KIND_COLORS[k] }, svg);
      label(svg, lx + 14, y0 + 5 * (rowH + 3) + 13, s, { "font-size": 10 });
      lx += 22 + 6.2 * s.length;
    });
  }

  function drawGrids(svg, ids, segments, state, x0, y0, width, height) {
    label(svg, x0, y0 - 8, "Vision tokens on their merged grids: t is constant per frame group, h and w step along rows and columns", { "font-weight": "bold" });
    const items = segments.filter((s) => s.type !== "text");
    const sel = Math.min(state.token, ids.kind.length - 1);
    let x = x0;
    items.forEach((seg, k) => {
      const first = ids.item.indexOf(k);
      const H = seg.grid[1] / 2, W = seg.grid[2] / 2, frames = seg.type === "video" ? seg.grid[0] : 1;
      const shown = Math.min(frames, 4);
      const avail = seg.type === "video" ? (width * 0.6) / shown - 10 : width * 0.3;
      const cs = Math.max(2, Math.min(22, avail / W, (height - 60) / H));
      const color = KIND_COLORS[seg.type];
      label(svg, x, y0 + 6, seg.type + " " + seg.pixels[0] + "x" + seg.pixels[1] + " px: " + seg.grid[1] + "x" + seg.grid[2] + " patches", { "font-size": 10, fill: color });
      label(svg, x, y0 + 18, (frames > 1 ? frames + " frame groups x " : "") + H + "x" + W + " merged = " + frames * H * W + " tokens", { "font-size": 10, fill: color });
      for (let f = 0; f < shown; f++) {
        const fx = x + f * (W * cs + 10), fy = y0 + 26, base = first + f * H * W;
        for (let r = 0; r < H; r++) {
          for (let c = 0; c < W; c++) {
            const i = base + r * W + c;
            el("rect", { x: fx + c * cs, y: fy + r * cs, width: Math.max(cs - 0.5, 1), height: Math.max(cs - 0.5, 1), fill: color, "fill-opacity": i === sel ? 1 : 0.3, class: "grid-cell", "data-token": i }, svg);
            if (cs >= 20) label(svg, fx + c * cs + 2, fy + r * cs + cs * 0.65, ids.h[i] + "," + ids.w[i], { "font-size": 7 });
          }
        }
        const last = base + H * W - 1;
        label(svg, fx, fy + H * cs + 11, "t=" + ids.t[base], { "font-size": 9 });
        if (f === 0) label(svg, fx, fy + H * cs + 22, "h " + ids.h[base] + ".." + ids.h[last] + ", w " + ids.w[base] + ".." + ids.w[last], { "font-size": 9 });
      }
      if (frames > shown) label(svg, x + shown * (W * cs + 10), y0 + 26 + (H * cs) / 2, "+" + (frames - shown) + " more", { "font-size": 9 });
      x += Math.max(shown * (W * cs + 10), 150) + 40;
    });
  }

  function drawBands(svg, streams, x0, y0, width) {
    const half = streams.length, cw = width / half;
    label(svg, x0, y0 - 8, "mrope_section: which stream drives each of the head_dim/2 = " + half + " rotary frequencies (fast -> slow)", { "font-weight": "bold" });
    for (let j = 0; j < half; j++) el("rect", { x: x0 + j * cw, y: y0, width: Math.max(cw - 0.4, 0.5), height: 14, fill: STREAM_COLORS[streams[j]], class: "band-cell", "data-stream": STREAMS[streams[j]] }, svg);
    const counts = [0, 1, 2].map((s) => streams.filter((v) => v === s).length);
    label(svg, x0, y0 + 28, "t: " + counts[0] + " frequencies, h: " + counts[1] + ", w: " + counts[2] + "  (features j and j + head_dim/2 share frequency j)", { "font-size": 10 });
  }

  function drawDials(svg, ids, streams, freqs, state, x0, y0, width) {
    const sel = Math.min(state.token, ids.kind.length - 1);
    const pos = [ids.t[sel], ids.h[sel], ids.w[sel]];
    label(svg, x0, y0 - 8, "Rotation of the selected token (#" + sel + ", " + ids.kind[sel] + ", (t,h,w) = (" + pos.join(", ") + "), 1D id " + ids.oneD[sel] + ") per band", { "font-weight": "bold" });
    const perBand = 8, r = 15, gap = width / (3 * perBand + 2);
    let k = 0;
    [0, 1, 2].forEach((s) => {
      const js = [];
      streams.forEach((v, j) => { if (v === s) js.push(j); });
      const pick = [];
      for (let q = 0; q < Math.min(perBand, js.length); q++) pick.push(js[Math.round((q * (js.length - 1)) / Math.max(Math.min(perBand, js.length) - 1, 1))]);
      pick.forEach((j) => {
        const cx = x0 + gap * (k + s + 0.5) + r, cy = y0 + 24;
        el("circle", { cx: cx, cy: cy, r: r, fill: "#f7f7f7", stroke: STREAM_COLORS[s] }, svg);
        const ghost = (ids.oneD[sel] * freqs[j]) % (2 * Math.PI);
        el("line", { x1: cx, y1: cy, x2: cx + r * Math.cos(ghost), y2: cy - r * Math.sin(ghost), stroke: "#bbbbbb", "stroke-width": 1.5, "stroke-dasharray": "2 2" }, svg);
        const angle = (pos[s] * freqs[j]) % (2 * Math.PI);
        el("line", { x1: cx, y1: cy, x2: (cx + r * Math.cos(angle)).toFixed(3), y2: (cy - r * Math.sin(angle)).toFixed(3), stroke: STREAM_COLORS[s], "stroke-width": 2, class: "dial-hand", "data-freq": j }, svg);
        label(svg, cx - 8, cy + r + 11, "j=" + j, { "font-size": 8 });
        k += 1;
      });
    });
    label(svg, x0, y0 + 68, "coloured hand: M-RoPE angle = (id of the band's stream) x theta_j; grey dashed: 1D RoPE angle = token index x theta_j", { "font-size": 10 });
  }

  function render(rootEl, state) {
    const svg = rootEl.querySelector("svg");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const status = rootEl.querySelector(".qm-status");
    let segments, ids, streams;
    try {
      segments = buildSegments(state);
      ids = ropeIndex(segments, 2);
      streams = streamIndex(state.section, state.layout);
      status.textContent = "";
    } catch (e) {
      status.textContent = "Error: " + e.message;
      return;
    }
    const tokenInput = rootEl.querySelector("input[name=token]");
    if (tokenInput) { tokenInput.max = ids.kind.length - 1; if (state.token > ids.kind.length - 1) { state.token = ids.kind.length - 1; tokenInput.value = state.token; } }
    const oneDMax = ids.kind.length - 1;
    rootEl.querySelector(".qm-summary").textContent =
      ids.kind.length + " tokens; largest position id: M-RoPE " + ids.maxId + " vs 1D RoPE " + oneDMax +
      " (" + (oneDMax / Math.max(ids.maxId, 1)).toFixed(1) + "x smaller); rope_delta " + ids.ropeDelta;
    drawStrip(svg, ids, state, 60, 30, 680);
    drawGrids(svg, ids, segments, state, 60, 170, 680, 150);
    drawBands(svg, streams, 60, 360, 680);
    drawDials(svg, ids, streams, invFreq(2 * streams.length, state.theta), state, 60, 430, 680);
    rootEl.qwenMropeIds = ids;
  }

  function mount(rootEl, initial) {
    const state = Object.assign({}, initial);
    rootEl.innerHTML =
      '<div class="qm-controls" style="margin-bottom:6px"></div>' +
      '<div class="qm-summary" style="font:12px monospace;color:#444"></div>' +
      '<div class="qm-status" style="font:12px sans-serif;color:#c0392b"></div>' +
      '<svg xmlns="http://www.w3.org/2000/svg" width="760" height="530" style="max-width:100%;height:auto" viewBox="0 0 760 530"></svg>';
    const controls = rootEl.querySelector(".qm-controls");
    const add = (text, input) => {
      const wrap = document.createElement("label");
      wrap.style.cssText = "display:inline-flex;align-items:center;gap:4px;margin:2px 10px 2px 0;font:12px sans-serif";
      wrap.appendChild(document.createTextNode(text));
      wrap.appendChild(input);
      controls.appendChild(wrap);
      return input;
    };
    const slider = (name, text, min, max, step) => {
      const input = document.createElement("input");
      Object.assign(input, { type: "range", min: min, max: max, step: step, name: name, value: state[name] });
      const shown = document.createElement("span");
      shown.style.cssText = "min-width:30px;font-family:monospace";
      shown.textContent = state[name];
      input.addEventListener("input", () => { state[name] = +input.value; shown.textContent = input.value; render(rootEl, state); });
      add(text, input).after(shown);
    };
    slider("textBefore", "text", 0, 8, 1);
    slider("imageHeight", "image h px", 28, 336, 14);
    slider("imageWidth", "image w px", 28, 336, 14);
    slider("textBetween", "text", 0, 8, 1);
    slider("videoFrames", "video frames", 1, 12, 1);
    slider("videoHeight", "video h px", 28, 224, 14);
    slider("videoWidth", "video w px", 28, 224, 14);
    slider("textAfter", "text", 0, 8, 1);
    slider("token", "selected token", 0, 600, 1);
    const layout = document.createElement("select");
    layout.name = "layout";
    const presets = { contiguous: [16, 24, 24], interleaved: [24, 20, 20] };
    [["contiguous", "Qwen2-VL: contiguous [16, 24, 24]"], ["interleaved", "Qwen3-VL: interleaved [24, 20, 20]"]].forEach(([v, s]) => {
      const o = document.createElement("option"); o.value = v; o.textContent = s; layout.appendChild(o);
    });
    layout.value = state.layout;
    layout.addEventListener("change", () => {
      state.layout = layout.value; state.section = presets[layout.value]; render(rootEl, state);
    });
    add("sections", layout);
    rootEl.querySelector("svg").addEventListener("click", (event) => {
      const token = event.target.getAttribute && event.target.getAttribute("data-token");
      if (token === null || token === undefined) return;
      state.token = +token;
      rootEl.querySelector("input[name=token]").value = state.token;
      render(rootEl, state);
    });
    render(rootEl, state);
    rootEl.qwenMropeState = state;
    return state;
  }

  root.QwenMrope = { version: "1", roundHalfEven, smartResize, ropeIndex, streamIndex, invFreq, buildSegments, mount, render };
})(typeof window !== "undefined" ? window : globalThis);
