// NeuronMap attention viewer. One module renders both views: the live anywidget view (model = the widget's
// model) and the static HTML view (model = staticModel(data), backed by data embedded in the page).
//
// Model fields: layers (layer indices available), n_heads, layer, heads (selected), prompt, prompts (prompt
// indices available), tokens (the prompt's tokens, as text), n_total (tokens before any truncation), thumb_size, note,
// thumbs (uint8 [layers, heads, T, T] thumbnails, max-pooled), detail (zlib-deflated uint8 [heads, n, n]
// patterns of one layer and prompt), detail_key ("layer:prompt" of detail). Bytes hold round(255 * sqrt(p)):
// square-root steps keep diffuse attention (p down to ~1e-5) that linear 8-bit steps would round to zero, and
// the byte itself is the colour depth, so faint attention stays visible. Values shown as numbers are p.
// Every token reaches the page through textContent, never as markup.

import { asBytes, inflate, decodeBase64, element, ownKeys, shown, textOn, localModel } from "./common.js";

const PALETTE = [
  [31, 119, 180], [214, 39, 40], [44, 160, 44], [148, 103, 189], [255, 127, 14],
  [23, 190, 207], [227, 119, 194], [140, 86, 75], [188, 189, 34], [127, 127, 127],
];

// How far each arrow key moves the focus along the token strip.
const TOKEN_STEPS = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };

function headColour(head) {
  return PALETTE[head % PALETTE.length];
}

// Overlay: the backdrop moved towards each selected head's colour in proportion to its shade (sqrt of the
// attention). On white this is white minus each head's complement, as in the matrix.
function mix(shades, heads, base) {
  const rgb = base.slice();
  heads.forEach((head, k) => {
    const colour = headColour(head);
    for (let c = 0; c < 3; c++) rgb[c] -= shades[k] * (base[c] - colour[c]);
  });
  return rgb.map((value) => Math.round(Math.min(255, Math.max(0, value))));
}

// The colour the tokens sit on: the first opaque background from `start` up (the theme's), else white.
function backdrop(start) {
  for (let at = start; at; at = at.parentElement) {
    const rgba = /^rgba?\(([^)]*)\)/.exec(getComputedStyle(at).backgroundColor);
    const channels = rgba ? rgba[1].split(/[\s,/]+/).map(Number) : [];
    if (channels.length >= 3 && (channels.length < 4 || channels[3] > 0)) return channels.slice(0, 3);
  }
  return [255, 255, 255];
}

function render({ model, el }) {
  el.classList.add("nm-attn");
  const state = {
    detail: null, key: null, n: 0, focus: null, pinned: false, mode: "from", disposed: false, active: 0,
  };

  const bar = element("div", "nm-bar");
  const layerLabel = element("label", null, "layer ");
  const layerSelect = ownKeys(element("select", "nm-layer"));
  layerLabel.append(layerSelect);
  const promptLabel = element("label", null, " prompt ");
  const promptSelect = ownKeys(element("select", "nm-prompt"));
  promptLabel.append(promptSelect);
  const modeButton = ownKeys(element("button", "nm-mode"));
  modeButton.type = "button";
  bar.append(layerLabel, promptLabel, modeButton);
  const grid = element("div", "nm-grid");
  grid.setAttribute("role", "group");
  const body = element("div", "nm-body");
  const plot = element("div", "nm-plot");
  const matrixBox = element("div", "nm-matrix");
  const canvas = element("canvas");
  canvas.setAttribute("role", "img");
  const crosshair = element("div", "nm-crosshair");
  matrixBox.append(canvas, crosshair);
  const keyAxis = element("div", "nm-axis nm-axis-key", "key \u2192");
  const queryAxis = element("div", "nm-axis nm-axis-query", "query \u2193");
  keyAxis.title = "columns: the tokens attended to";
  queryAxis.title = "rows: the tokens attending";
  plot.append(keyAxis, queryAxis, matrixBox);
  const side = element("div", "nm-side");
  const info = element("div", "nm-info", "hover or focus a token, or hover a cell (colour depth \u221d \u221aattention)");
  info.setAttribute("aria-live", "polite");
  const tokenBox = element("div", "nm-tokens");
  tokenBox.setAttribute("role", "listbox");
  tokenBox.setAttribute(
    "aria-label",
    "tokens: hover one, or focus it (Tab, then arrow keys), to see its attention; Enter or Space pins it",
  );
  side.append(info, tokenBox);
  body.append(plot, side);
  const note = element("div", "nm-note");
  el.append(bar, grid, body, note);

  const selected = () => model.get("heads").slice();
  const wantedKey = () => `${model.get("layer")}:${model.get("prompt")}`;

  function fillControls() {
    layerSelect.replaceChildren(...model.get("layers").map((layer) => {
      const option = element("option", null, String(layer));
      option.value = String(layer);
      return option;
    }));
    layerSelect.value = String(model.get("layer"));
    const prompts = model.get("prompts");
    promptLabel.style.display = prompts.length > 1 ? "" : "none";
    promptSelect.replaceChildren(...prompts.map((prompt) => {
      const option = element("option", null, String(prompt));
      option.value = String(prompt);
      return option;
    }));
    promptSelect.value = String(model.get("prompt"));
    modeButton.textContent = state.mode === "from" ? "showing: attention from the token" : "showing: attention to the token";
    note.textContent = model.get("note");
  }

  function drawThumbs() {
    const heads = model.get("n_heads");
    const size = model.get("thumb_size");
    const thumbs = asBytes(model.get("thumbs"));
    const index = model.get("layers").indexOf(model.get("layer"));
    const cells = [];
    for (let head = 0; head < heads; head++) {
      const cell = ownKeys(element("div", "nm-head"));
      cell.dataset.head = String(head);
      cell.tabIndex = 0;
      cell.setAttribute("role", "button");
      const thumb = element("canvas");
      thumb.width = size;
      thumb.height = size;
      const context = thumb.getContext("2d");
      const image = context.createImageData(size, size);
      const offset = (index * heads + head) * size * size;
      const [cr, cg, cb] = headColour(head);
      for (let p = 0; p < size * size; p++) {
        const w = (thumbs[offset + p] || 0) / 255;
        image.data[4 * p] = 255 - w * (255 - cr);
        image.data[4 * p + 1] = 255 - w * (255 - cg);
        image.data[4 * p + 2] = 255 - w * (255 - cb);
        image.data[4 * p + 3] = 255;
      }
      context.putImageData(image, 0, 0);
      const label = element("span", null, `head ${head}`);
      cell.append(thumb, label);
      cell.addEventListener("click", () => toggleHead(head));
      cell.addEventListener("keydown", (event) => {
        if (event.key !== "Enter" && event.key !== " ") return;
        event.preventDefault();
        toggleHead(head);
      });
      cells.push(cell);
    }
    grid.replaceChildren(...cells);
    grid.setAttribute("aria-label", `heads of layer ${model.get("layer")}: press one to overlay it or take it away`);
    markHeads();
  }

  // Selection is marked in place, so a head toggled from the keyboard keeps the focus.
  function markHeads() {
    const chosen = selected();
    for (const cell of grid.children) {
      const head = Number(cell.dataset.head);
      const on = chosen.includes(head);
      cell.classList.toggle("nm-selected", on);
      cell.setAttribute("aria-pressed", String(on));
      cell.style.borderColor = on ? `rgb(${headColour(head).join(",")})` : "";
    }
  }

  function toggleHead(head) {
    const heads = selected();
    const at = heads.indexOf(head);
    if (at >= 0) heads.splice(at, 1);
    else heads.push(head);
    heads.sort((a, b) => a - b);
    model.set("heads", heads);
    model.save_changes();
    markHeads();
    drawMatrix();
    paintTokens();
  }

  // One token is in the Tab order at a time (a roving tabindex); arrow keys move it along the prompt.
  function drawTokens() {
    const tokens = model.get("tokens");
    state.active = Math.min(state.active, Math.max(0, tokens.length - 1));
    tokenBox.replaceChildren(...tokens.map((token, i) => {
      const span = ownKeys(element("span", "nm-token", shown(token)));
      span.dataset.index = String(i);
      span.title = `${i}: ${token}`;
      span.setAttribute("role", "option");
      span.setAttribute("aria-selected", "false");
      span.tabIndex = i === state.active ? 0 : -1;
      return span;
    }));
  }

  function moveTo(index) {
    const spans = tokenBox.children;
    if (!spans.length) return;
    const target = Math.min(spans.length - 1, Math.max(0, index));
    if (spans[state.active]) spans[state.active].tabIndex = -1;
    state.active = target;
    spans[target].tabIndex = 0;
    spans[target].focus();
  }

  function shadesAt(i, j) {
    const n = state.n;
    return selected().map((head) => state.detail[head * n * n + i * n + j] / 255);
  }

  const weightsAt = (i, j) => shadesAt(i, j).map((shade) => shade * shade);

  function drawMatrix() {
    if (!state.detail || state.key !== wantedKey()) {
      matrixBox.classList.add("nm-loading");
      return;
    }
    matrixBox.classList.remove("nm-loading");
    const n = state.n;
    const heads = selected();
    canvas.width = n;
    canvas.height = n;
    const context = canvas.getContext("2d");
    const image = context.createImageData(n, n);
    const pixels = image.data;
    pixels.fill(255);
    for (const head of heads) {
      const [cr, cg, cb] = headColour(head);
      const base = head * n * n;
      for (let p = 0; p < n * n; p++) {
        const value = state.detail[base + p];
        if (value === 0) continue;
        const w = value / 255;
        pixels[4 * p] -= w * (255 - cr);
        pixels[4 * p + 1] -= w * (255 - cg);
        pixels[4 * p + 2] -= w * (255 - cb);
      }
    }
    context.putImageData(image, 0, 0);
    canvas.style.width = `${Math.min(Math.max(n * 6, 160), 440)}px`;
    canvas.setAttribute(
      "aria-label",
      `attention matrix of layer ${model.get("layer")}, heads ${heads.join(", ") || "none"}, ${n} tokens: ` +
        "row i is query token i (attending), column j is key token j (attended to); colour depth \u221d \u221aattention",
    );
    placeCrosshair();
  }

  function placeCrosshair() {
    if (state.focus === null || !state.n) {
      crosshair.style.display = "none";
      return;
    }
    const cell = 100 / state.n;
    crosshair.style.display = "block";
    if (state.mode === "from") {
      Object.assign(crosshair.style, { top: `${state.focus * cell}%`, left: "0", width: "100%", height: `${cell}%` });
    } else {
      Object.assign(crosshair.style, { left: `${state.focus * cell}%`, top: "0", height: "100%", width: `${cell}%` });
    }
  }

  // Highlighted tokens get their colour's better text colour (black or white), so every token stays readable.
  function paintTokens() {
    const spans = tokenBox.children;
    const ready = state.detail && state.key === wantedKey();
    const heads = selected();
    const base = ready && state.focus !== null ? backdrop(tokenBox) : null;
    for (let j = 0; j < spans.length; j++) {
      const span = spans[j];
      span.classList.toggle("nm-focus", j === state.focus);
      span.setAttribute("aria-selected", String(state.pinned && j === state.focus));
      if (!ready || state.focus === null || j >= state.n || heads.length === 0) {
        span.style.background = "";
        span.style.color = "";
        delete span.dataset.weight;
        continue;
      }
      const shades = state.mode === "from" ? shadesAt(state.focus, j) : shadesAt(j, state.focus);
      const rgb = mix(shades, heads, base);
      span.style.background = `rgb(${rgb.join(",")})`;
      span.style.color = textOn(rgb);
      span.dataset.weight = (Math.max(...shades) ** 2).toFixed(3);
    }
    placeCrosshair();
    if (ready && state.focus !== null && state.focus < state.n) {
      const tokens = model.get("tokens");
      const verb = state.mode === "from" ? "attends to" : "is attended by";
      info.textContent = `token ${state.focus} \u201c${shown(tokens[state.focus])}\u201d ${verb} (colour per head)`;
    }
  }

  // Show `index` (null: nothing) unless a token is pinned; `pin` pins it, or unpins it if it was pinned, and it
  // stays shown while the pointer or the focus is on it.
  function focus(index, pin) {
    if (pin) {
      state.pinned = !(state.pinned && state.focus === index);
      state.focus = index;
    } else if (!state.pinned) {
      state.focus = index;
    }
    paintTokens();
  }

  tokenBox.addEventListener("mouseover", (event) => {
    const span = event.target.closest(".nm-token");
    if (span) focus(Number(span.dataset.index), false);
  });
  tokenBox.addEventListener("mouseleave", () => focus(null, false));
  tokenBox.addEventListener("click", (event) => {
    const span = event.target.closest(".nm-token");
    if (span) focus(Number(span.dataset.index), true);
  });
  // The keyboard does what the mouse does: focusing a token shows its attention, Enter or Space pins it.
  tokenBox.addEventListener("focusin", (event) => {
    const span = event.target.closest(".nm-token");
    if (!span) return;
    const index = Number(span.dataset.index);
    if (index !== state.active) moveTo(index);
    focus(index, false);
  });
  tokenBox.addEventListener("focusout", (event) => {
    if (!tokenBox.contains(event.relatedTarget)) focus(null, false);
  });
  tokenBox.addEventListener("keydown", (event) => {
    const span = event.target.closest(".nm-token");
    if (!span) return;
    const index = Number(span.dataset.index);
    if (event.key in TOKEN_STEPS) moveTo(index + TOKEN_STEPS[event.key]);
    else if (event.key === "Home") moveTo(0);
    else if (event.key === "End") moveTo(tokenBox.children.length - 1);
    else if (event.key === "Enter" || event.key === " ") focus(index, true);
    else return;
    event.preventDefault();
  });
  canvas.addEventListener("mousemove", (event) => {
    if (!state.detail || !state.n) return;
    const box = canvas.getBoundingClientRect();
    const i = Math.min(state.n - 1, Math.floor(((event.clientY - box.top) / box.height) * state.n));
    const j = Math.min(state.n - 1, Math.floor(((event.clientX - box.left) / box.width) * state.n));
    const tokens = model.get("tokens");
    const values = selected().map((head, k) => `head ${head}: ${weightsAt(i, j)[k].toFixed(3)}`).join(" \u00b7 ");
    info.textContent = `${i} \u201c${shown(tokens[i])}\u201d \u2192 ${j} \u201c${shown(tokens[j])}\u201d  ${values}`;
  });
  layerSelect.addEventListener("change", () => {
    model.set("layer", Number(layerSelect.value));
    model.save_changes();
    drawThumbs();
    drawMatrix();
    paintTokens();
  });
  promptSelect.addEventListener("change", () => {
    model.set("prompt", Number(promptSelect.value));
    model.save_changes();
    state.focus = null;
    state.pinned = false;
    drawMatrix();
  });
  modeButton.addEventListener("click", () => {
    state.mode = state.mode === "from" ? "to" : "from";
    fillControls();
    paintTokens();
  });

  async function loadDetail() {
    const key = model.get("detail_key");
    const bytes = await inflate(model.get("detail"));
    if (state.disposed || key !== model.get("detail_key")) return;
    state.detail = bytes;
    state.key = key;
    const heads = model.get("n_heads");
    state.n = Math.round(Math.sqrt(bytes.length / heads));
    drawMatrix();
    paintTokens();
    el.dataset.ready = key;
  }

  const listeners = {
    "change:detail": () => { loadDetail(); },
    "change:tokens": () => { drawTokens(); paintTokens(); },
    "change:thumbs": () => drawThumbs(),
    "change:layer": () => fillControls(),
    "change:prompt": () => fillControls(),
    "change:note": () => fillControls(),
  };
  for (const [event, callback] of Object.entries(listeners)) model.on(event, callback);

  fillControls();
  drawThumbs();
  drawTokens();
  drawMatrix();
  loadDetail();
  return () => {
    state.disposed = true;
    for (const [event, callback] of Object.entries(listeners)) model.off(event, callback);
  };
}

// The static view's stand-in for the widget model: the same get/set/save_changes/on, backed by embedded data.
// `views` holds each embedded prompt's tokens and thumbnails, `details` one deflated pattern block per embedded
// "layer:prompt" (bytes as base64 strings). Choosing a layer or a prompt swaps in its data, as the kernel would.
function staticModel(data) {
  const state = Object.assign({}, data);
  delete state.views;
  delete state.details;
  const model = localModel(state, (key) => {
    if (key === "layer") showLayer();
    if (key === "prompt") showPrompt();
  });
  const showLayer = () => {
    state.detail_key = `${state.layer}:${state.prompt}`;
    state.detail = decodeBase64(data.details[state.detail_key]);
    model.changed.add("detail");
  };
  const showPrompt = () => {
    const view = data.views[String(state.prompt)];
    Object.assign(state, view, { thumbs: decodeBase64(view.thumbs) });
    for (const key of ["tokens", "n_total", "thumb_size", "thumbs"]) model.changed.add(key);
    showLayer();
  };
  showPrompt();
  model.changed.clear();
  return model;
}

export default { render };
