// M-RoPE explorer: the (t, h, w) position ids of Qwen2-VL, Qwen2.5-VL and Qwen3-VL for a prompt you assemble,
// computed in the browser. Everything runs client-side, so the widget stays interactive in Jupyter, Colab and
// the static book. The position rule mirrors qwen_edu.vision.mrope.get_rope_index (Qwen's rope2d.py rule), with
// Qwen2.5-VL's absolute-time temporal ids (qwen2_5_vl_rope_index) and Qwen3-VL's timestamped frame groups
// (qwen3_vl_rope_index); the tests run QwenMrope.ropeIndex, buildSegments and smartResize under node and in
// headless Chromium against the Python.
(function (root) {
  if (root.QwenMrope && root.QwenMrope.version >= "2") return;

  const STREAMS = ["t", "h", "w"];
  const STREAM_COLORS = ["#d62728", "#2ca02c", "#1f77b4"];
  const KIND_COLORS = { text: "#9e9e9e", time: "#f2b701", start: "#444444", end: "#444444", image: "#6a51a3", video: "#e6550d" };
  const MODELS = {
    qwen2_vl: { patch: 14, layout: "contiguous", section: [16, 24, 24], theta: 1000000, name: "Qwen2-VL" },
    qwen2_5_vl: { patch: 14, layout: "contiguous", section: [16, 24, 24], theta: 1000000, name: "Qwen2.5-VL" },
    qwen3_vl: { patch: 16, layout: "interleaved", section: [24, 20, 20], theta: 5000000, name: "Qwen3-VL" },
  };

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

  // Python's f"{x:.1f}": the binary value rounded to one decimal, exact halves to the even digit
  // (0.25 -> "0.2", 1.25 -> "1.2", 0.35 -> "0.3"), where JavaScript's toFixed would round halves up.
  function pyFixed1(x) {
    const digits = Math.abs(x).toPrecision(21).split("e")[0];  // enough digits to see which side of a half
    const [whole, frac] = (digits.includes(".") ? digits : digits + ".").split(".");
    const tenths = BigInt(whole + (frac + "0").slice(0, 1)), rest = (frac + "00").slice(1);
    let n = tenths;
    if (/^5(0*)$/.test(rest)) n = tenths % 2n === 0n ? tenths : tenths + 1n;
    else if (rest > "5") n = tenths + 1n;
    const str = n.toString().padStart(2, "0");
    return (x < 0 && n > 0n ? "-" : "") + str.slice(0, -1) + "." + str.slice(-1);
  }

  // Qwen3-VL's timestamp before frame group g: "<t seconds>", t the mean time of the group's first and last
  // frame (frame indices 0, 1, ... at `fps`; an odd count padded by repeating the last frame).
  function frameTimestamps(frames, fps) {
    const idx = [];
    for (let i = 0; i < frames; i++) idx.push(i);
    if (idx.length % 2) idx.push(idx[idx.length - 1]);
    const out = [];
    for (let g = 0; g < idx.length; g += 2) out.push((idx[g] / fps + idx[g + 1] / fps) / 2);
    return out;
  }
  // "<12.5 seconds>" is "<", one token per digit, ".", " seconds", ">" for Qwen's tokenizer: digits + 4 tokens.
  function timestampTokens(text) { return (text.match(/[0-9]/g) || []).length + 4; }

  // Qwen2.5-VL's temporal offset of frame group f: floor(f * second_per_grid * tokens_per_second), computed in
  // float32 in that order as Qwen's code does (Math.fround rounds each product to float32).
  function absoluteTime(f, secondPerGrid, tokensPerSecond) {
    return Math.trunc(Math.fround(Math.fround(f * Math.fround(secondPerGrid)) * tokensPerSecond));
  }

  // segments: [{type: "text", length, [kind, label]}, {type: "image" | "video", grid: [t, h, w] (patch units),
  // [secondPerGrid, tokensPerSecond] (absolute time), [item, frame0] (a frame group of a split video)}, ...].
  // Vision items are wrapped in <|vision_start|> ... <|vision_end|> as in a real prompt. Returns per token its
  // kind, its (t, h, w) ids, its 1D id, the item it belongs to (or -1), its cell on the merged grid and a label.
  function ropeIndex(segments, mergeSize) {
    const m = mergeSize || 2;
    const out = { kind: [], t: [], h: [], w: [], oneD: [], item: [], cell: [], label: [] };
    let next = 0, itemNo = 0;
    const push = (kind, t, h, w, item, cell, label) => {
      out.kind.push(kind); out.t.push(t); out.h.push(h); out.w.push(w);
      out.oneD.push(out.oneD.length); out.item.push(item); out.cell.push(cell); out.label.push(label || "");
    };
    const text = (kind, label) => { push(kind, next, next, next, -1, null, label); next += 1; };
    for (const seg of segments) {
      if (seg.type === "text") {
        for (let i = 0; i < seg.length; i++) text(seg.kind || "text", seg.label);
        continue;
      }
      const [gt, gh, gw] = seg.grid;
      if (gh % m || gw % m) throw new Error("grid h and w must be multiples of the merge size " + m);
      text("start");
      const H = gh / m, W = gw / m, start = next, item = seg.item === undefined ? itemNo : seg.item;
      let last = 0;
      for (let f = 0; f < gt; f++) {
        const dt = seg.secondPerGrid === undefined ? f : absoluteTime(f, seg.secondPerGrid, seg.tokensPerSecond);
        last = Math.max(last, dt);
        for (let r = 0; r < H; r++)
          for (let c = 0; c < W; c++) push(seg.type, start + dt, start + r, start + c, item, [(seg.frame0 || 0) + f, r, c]);
      }
      next = start + Math.max(last, H - 1, W - 1) + 1;  // Qwen's rule: the largest id so far + 1
      itemNo = item + 1;
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

  // The prompt the controls describe: text, an image, text, a video, text -- as the chosen model lays it out.
  // Qwen2.5-VL puts the video's frame groups on the clock (fps -> second_per_grid = 2 / fps); Qwen3-VL splits
  // the video into frame groups, each after its timestamp text, and uses 16-pixel patches.
  function buildSegments(state) {
    const model = MODELS[state.model || "qwen2_vl"], patch = model.patch;
    const [ih, iw] = smartResize(state.imageHeight, state.imageWidth, 2 * patch);
    const [vh, vw] = smartResize(state.videoHeight, state.videoWidth, 2 * patch);
    const groups = Math.ceil(state.videoFrames / 2);
    const video = [];
    if (state.model === "qwen3_vl") {
      frameTimestamps(state.videoFrames, state.fps).forEach((seconds, g) => {
        const label = "<" + pyFixed1(seconds) + " seconds>";
        video.push({ type: "text", kind: "time", length: timestampTokens(label), label: label });
        video.push({ type: "video", grid: [1, vh / patch, vw / patch], pixels: [vh, vw], item: 1, frame0: g });
      });
    } else {
      const seg = { type: "video", grid: [groups, vh / patch, vw / patch], pixels: [vh, vw], item: 1 };
      if (state.model === "qwen2_5_vl") Object.assign(seg, { secondPerGrid: 2 / state.fps, tokensPerSecond: state.tokensPerSecond });
      video.push(seg);
    }
    return [
      { type: "text", length: state.textBefore },
      { type: "image", grid: [1, ih / patch, iw / patch], pixels: [ih, iw], item: 0 },
      { type: "text", length: state.textBetween },
      ...video,
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
    [["text", "text"], ["time", "timestamp"], ["start", "vision start / end"], ["image", "image"], ["video", "video"]].forEach(([k, s]) => {
      el("rect", { x: lx, y: y0 + 5 * (rowH + 3) + 4, width: 10, height: 10, fill: KIND_COLORS[k] }, svg);
      label(svg, lx + 14, y0 + 5 * (rowH + 3) + 13, s, { "font-size": 10 });
      lx += 22 + 6.2 * s.length;
    });
  }

  function drawGrids(svg, ids, segments, state, x0, y0, width, height) {
    label(svg, x0, y0 - 8, "Vision tokens on their merged grids: t is constant per frame group, h and w step along rows and columns", { "font-weight": "bold" });
    // one entry per image / video (a Qwen3-VL video arrives as one segment per frame group)
    const items = [];
    segments.filter((s) => s.type !== "text").forEach((s) => {
      const k = s.item === undefined ? items.length : s.item;
      if (items[k]) items[k].grid = [items[k].grid[0] + s.grid[0], s.grid[1], s.grid[2]];
      else items[k] = { type: s.type, grid: s.grid.slice(), pixels: s.pixels };
    });
    const where = {};  // "item,f,r,c" -> token index
    ids.cell.forEach((cell, i) => { if (cell) where[ids.item[i] + "," + cell.join(",")] = i; });
    const sel = Math.min(state.token, ids.kind.length - 1);
    let x = x0;
    items.forEach((seg, k) => {
      const H = seg.grid[1] / 2, W = seg.grid[2] / 2, frames = seg.type === "video" ? seg.grid[0] : 1;
      const shown = Math.min(frames, 4);
      const avail = seg.type === "video" ? (width * 0.6) / shown - 10 : width * 0.3;
      const cs = Math.max(2, Math.min(22, avail / W, (height - 60) / H));
      const color = KIND_COLORS[seg.type];
      label(svg, x, y0 + 6, seg.type + " " + seg.pixels[0] + "x" + seg.pixels[1] + " px: " + seg.grid[1] + "x" + seg.grid[2] + " patches", { "font-size": 10, fill: color });
      label(svg, x, y0 + 18, (frames > 1 ? frames + " frame groups x " : "") + H + "x" + W + " merged = " + frames * H * W + " tokens", { "font-size": 10, fill: color });
      for (let f = 0; f < shown; f++) {
        const fx = x + f * (W * cs + 10), fy = y0 + 26, base = where[k + "," + f + ",0,0"];
        for (let r = 0; r < H; r++) {
          for (let c = 0; c < W; c++) {
            const i = where[k + "," + f + "," + r + "," + c];
            el("rect", { x: fx + c * cs, y: fy + r * cs, width: Math.max(cs - 0.5, 1), height: Math.max(cs - 0.5, 1), fill: color, "fill-opacity": i === sel ? 1 : 0.3, class: "grid-cell", "data-token": i }, svg);
            if (cs >= 20) label(svg, fx + c * cs + 2, fy + r * cs + cs * 0.65, ids.h[i] + "," + ids.w[i], { "font-size": 7 });
          }
        }
        const last = where[k + "," + f + "," + (H - 1) + "," + (W - 1)];
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

  // One line on how the chosen model tells the LLM about the video's time.
  function clockLine(state, ids) {
    const groups = [];  // the t id of each frame group of the video (item 1)
    ids.cell.forEach((cell, i) => { if (cell && ids.item[i] === 1 && cell[1] === 0 && cell[2] === 0) groups[cell[0]] = ids.t[i]; });
    const seconds = state.videoFrames / state.fps;
    const clip = state.videoFrames + " frames at " + state.fps + " fps (" + seconds.toFixed(2) + " s)";
    if (state.model === "qwen2_5_vl") {
      const spg = 2 / state.fps;
      return "Qwen2.5-VL, absolute time: " + clip + "; second_per_grid = 2 / fps = " + spg.toFixed(3) +
        " s; x " + state.tokensPerSecond + " ids per second -> frame groups at t = " + groups.join(", ");
    }
    if (state.model === "qwen3_vl") {
      const stamps = ids.label.filter((l, i) => l && ids.label[i - 1] !== l);
      return "Qwen3-VL, timestamps as text: " + clip + "; each frame group follows its timestamp " +
        stamps.join(" ") + "; t ids " + groups.join(", ") + " only count tokens";
    }
    return "Qwen2-VL: " + clip + "; t steps by 1 per frame group whatever the frame rate: t = " + groups.join(", ");
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
    rootEl.querySelector(".qm-clock").textContent = clockLine(state, ids);
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
      '<div class="qm-clock" style="font:12px monospace;color:#444"></div>' +
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
    const slider = (name, text, min, max, step, after) => {
      const input = document.createElement("input");
      Object.assign(input, { type: "range", min: min, max: max, step: step, name: name, value: state[name] });
      const shown = document.createElement("span");
      shown.style.cssText = "min-width:30px;font-family:monospace";
      shown.textContent = state[name];
      input.addEventListener("input", () => {
        state[name] = +input.value; shown.textContent = input.value;
        if (after) after();
        render(rootEl, state);
      });
      add(text, input).after(shown);
      return { input: input, shown: shown };
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
    // the video's clock: frame rate and seconds per frame group (2 frames) are two views of one setting
    const perGrid = document.createElement("input");
    Object.assign(perGrid, { type: "number", name: "secondPerGrid", min: 0.25, max: 4, step: 0.25, value: 2 / state.fps });
    perGrid.style.width = "56px";
    const fps = slider("fps", "frame rate (fps)", 0.5, 8, 0.5, () => { perGrid.value = 2 / state.fps; });
    add("seconds per grid", perGrid);
    perGrid.addEventListener("input", () => {
      if (!(+perGrid.value > 0)) return;
      state.fps = 2 / +perGrid.value; fps.input.value = state.fps; fps.shown.textContent = +state.fps.toFixed(3);
      render(rootEl, state);
    });
    slider("tokensPerSecond", "ids per second", 1, 4, 1);
    const model = document.createElement("select");
    model.name = "model";
    Object.keys(MODELS).forEach((v) => { const o = document.createElement("option"); o.value = v; o.textContent = MODELS[v].name; model.appendChild(o); });
    model.value = state.model || "qwen2_vl";
    add("model", model);
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
    model.addEventListener("change", () => {
      const preset = MODELS[model.value];
      Object.assign(state, { model: model.value, layout: preset.layout, section: preset.section, theta: preset.theta });
      layout.value = preset.layout;
      render(rootEl, state);
    });
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

  root.QwenMrope = { version: "2", MODELS, roundHalfEven, smartResize, pyFixed1, frameTimestamps, timestampTokens, absoluteTime, ropeIndex, streamIndex, invFreq, buildSegments, mount, render };
})(typeof window !== "undefined" ? window : globalThis);
