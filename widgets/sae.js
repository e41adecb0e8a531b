// NeuronMap SAE feature browser and dashboard. One module renders both views: the live anywidget view (model = the
// widget's model) and the static HTML view (model = staticModel(data), backed by data embedded in the page).
//
// Model fields: mode ("browser": the table of latents beside a dashboard; "dashboard": one latent), title, note,
// list_data (deflated blob: the table), feature (the latent asked for), payload (deflated blob: that latent's
// dashboard), payload_key (the latent payload holds), error, and in the static view `available` (the latents whose
// dashboards are embedded). A blob is a uint32 head length, a JSON head, then binary arrays at 8-byte boundaries
// (head.arrays: name -> [offset, dtype, length]); activations come as float16. Every text from the data reaches the
// page through textContent or an attribute, never as markup.

import { asBytes, inflate, decodeBase64, element, svgElement, ownKeys, shown, textOn, localModel } from "./common.js";

const SHADE = [230, 85, 13];
const SHOWN_ROWS = 300;
const COLUMNS = [
  ["latent", "latent", "the latent's index"],
  ["density", "density", "fraction of tokens on which the latent fires"],
  ["max", "max", "its largest activation"],
  ["mean", "mean", "its mean activation where it fires"],
];

function half(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

const TYPES = { u8: Uint8Array, u16: Uint16Array, i32: Int32Array, u32: Uint32Array, f32: Float32Array };

function readBlob(bytes) {
  const own = asBytes(bytes).slice(); // its own buffer: typed arrays need aligned offsets
  const size = new DataView(own.buffer).getUint32(0, true);
  const head = JSON.parse(new TextDecoder().decode(own.subarray(4, 4 + size)));
  const start = 4 + size;
  const arrays = {};
  for (const [name, [offset, type, length]] of Object.entries(head.arrays)) {
    if (type === "f16") {
      const raw = new Uint16Array(own.buffer, start + offset, length);
      arrays[name] = Float32Array.from(raw, half);
    } else {
      arrays[name] = new TYPES[type](own.buffer, start + offset, length);
    }
  }
  return { head, arrays };
}

function number(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  if (value === 0) return "0";
  const text = Math.abs(value) >= 1e5 || Math.abs(value) < 1e-3 ? value.toExponential(2) : value.toPrecision(3);
  return text.includes("e") ? text : String(Number(text));
}

function percent(fraction) {
  if (fraction === 0) return "0%";
  const value = fraction * 100;
  return `${value >= 10 ? value.toFixed(1) : value >= 0.01 ? value.toPrecision(2) : value.toExponential(1)}%`;
}

function shade(value, scale) {
  const depth = scale > 0 && value > 0 ? Math.min(1, value / scale) : 0;
  return SHADE.map((channel) => Math.round(255 - depth * (255 - channel)));
}

function render({ model, el }) {
  el.classList.add("nm-sae");
  const state = { list: null, dash: null, sort: null, descending: true, query: "", disposed: false, picked: null };
  const browsing = model.get("mode") === "browser";

  const title = element("div", "nm-sae-title", model.get("title"));
  const body = element("div", "nm-sae-body");
  const side = element("div", "nm-sae-side");
  const search = ownKeys(element("input", "nm-sae-search"));
  search.type = "search";
  search.placeholder = "search a token or a latent number";
  search.setAttribute("aria-label", "search latents by a token their top contexts peak on or their decoder promotes");
  const count = element("div", "nm-sae-count");
  count.setAttribute("aria-live", "polite");
  const scroller = element("div", "nm-sae-scroll");
  const table = element("table", "nm-sae-table");
  const head = element("thead");
  const rows = element("tbody");
  table.append(head, rows);
  scroller.append(table);
  side.append(search, count, scroller);
  const dash = element("div", "nm-sae-dash");
  dash.setAttribute("aria-live", "polite");
  body.append(...(browsing ? [side, dash] : [dash]));
  const note = element("div", "nm-note", model.get("note"));
  el.append(title, body, note);

  // --- the table of latents ---

  function drawHead() {
    const cells = COLUMNS.map(([key, label, meaning]) => {
      const cell = ownKeys(element("th", null, label));
      cell.dataset.sort = key;
      cell.title = `${meaning} (press to sort)`;
      cell.tabIndex = 0;
      cell.setAttribute("role", "button");
      const on = state.sort === key;
      cell.setAttribute("aria-sort", on ? (state.descending ? "descending" : "ascending") : "none");
      if (on) cell.textContent = `${label} ${state.descending ? "\u25bc" : "\u25b2"}`;
      return cell;
    });
    const line = element("tr");
    line.append(...cells);
    head.replaceChildren(line);
  }

  function matches() {
    const list = state.list;
    const { latents, search: ids } = list.arrays;
    const width = list.head.search_width;
    const query = state.query.trim().toLowerCase();
    const order = [...Array(list.head.n).keys()];
    const column = state.sort === "latent" ? latents : list.arrays[state.sort];
    const sign = state.descending ? -1 : 1;
    order.sort((a, b) => sign * (column[a] - column[b]) || latents[a] - latents[b]);
    if (!query) return order;
    const texts = list.head.texts;
    const hit = (line) => {
      if (String(latents[line]) === query) return true;
      for (let k = 0; k < width; k++) {
        const id = ids[line * width + k];
        if (id >= 0 && (texts[id] || "").trim().toLowerCase().includes(query)) return true;
      }
      return false;
    };
    return order.filter(hit);
  }

  function drawRows() {
    if (!state.list) return;
    const { latents, density, max, mean } = state.list.arrays;
    const found = matches();
    const available = model.get("available");
    const lines = found.slice(0, SHOWN_ROWS).map((line) => {
      const latent = latents[line];
      const row = ownKeys(element("tr"));
      row.dataset.latent = String(latent);
      row.tabIndex = 0;
      if (available && !available.includes(latent)) {
        row.classList.add("nm-sae-absent");
        row.title = "not embedded in this static view";
      }
      if (latent === model.get("feature")) row.classList.add("nm-sae-current");
      row.append(
        element("td", "nm-num", String(latent)), element("td", "nm-num", percent(density[line])),
        element("td", "nm-num", number(max[line])), element("td", "nm-num", mean[line] < 0 ? "-" : number(mean[line])),
      );
      return row;
    });
    rows.replaceChildren(...lines);
    const total = state.list.head.n;
    const what = state.query.trim() ? `${found.length} of ${total} latents match` : `${total} latents`;
    count.textContent = found.length > SHOWN_ROWS ? `${what}; showing the first ${SHOWN_ROWS}` : what;
  }

  head.addEventListener("click", (event) => {
    const cell = event.target.closest("th");
    if (cell) sortBy(cell.dataset.sort);
  });
  head.addEventListener("keydown", (event) => {
    const cell = event.target.closest("th");
    if (!cell || (event.key !== "Enter" && event.key !== " ")) return;
    event.preventDefault();
    sortBy(cell.dataset.sort);
  });
  function sortBy(key) {
    state.descending = state.sort === key ? !state.descending : key !== "latent";
    state.sort = key;
    drawHead();
    drawRows();
  }
  search.addEventListener("input", () => {
    state.query = search.value;
    drawRows();
  });
  rows.addEventListener("click", (event) => {
    const row = event.target.closest("tr");
    if (row) open(Number(row.dataset.latent));
  });
  rows.addEventListener("keydown", (event) => {
    const row = event.target.closest("tr");
    if (!row) return;
    if (event.key === "Enter" || event.key === " ") open(Number(row.dataset.latent));
    else if (event.key === "ArrowDown" && row.nextElementSibling) row.nextElementSibling.focus();
    else if (event.key === "ArrowUp" && row.previousElementSibling) row.previousElementSibling.focus();
    else return;
    event.preventDefault();
  });

  function open(latent) {
    state.picked = null;
    model.set("feature", latent);
    model.save_changes();
    for (const row of rows.children) row.classList.toggle("nm-sae-current", Number(row.dataset.latent) === latent);
    if (model.get("payload_key") !== latent) dash.classList.add("nm-loading");
  }

  // --- one latent's dashboard ---

  function drawDashboard() {
    const error = model.get("error");
    dash.classList.remove("nm-loading");
    if (error) {
      dash.replaceChildren(element("div", "nm-sae-error", error));
      el.dataset.ready = `error:${model.get("feature")}`;
      return;
    }
    if (!state.dash) return;
    const { head: info, arrays } = state.dash;
    const texts = info.texts;
    const header = element("div", "nm-sae-head");
    header.append(element("span", "nm-sae-name", `latent ${info.latent}`));
    const mean = info.mean === null ? "-" : number(info.mean);
    header.append(element("span", "nm-sae-stats",
      ` fires on ${percent(info.count / info.n_tokens)} of tokens (${info.count.toLocaleString("en")} of ` +
      `${info.n_tokens.toLocaleString("en")}) \u00b7 max ${number(info.max)} \u00b7 mean when active ${mean}`));
    const top = element("div", "nm-sae-top");
    top.append(histogram(info, arrays.hist), logits(info, arrays, texts));
    const tokenBox = element("div", "nm-sae-picked");
    tokenBox.setAttribute("aria-live", "polite");
    const groups = element("div", "nm-sae-groups");
    let at = 0;
    let offset = 0;
    for (const group of info.groups) {
      const section = element("section", "nm-sae-group");
      const label = group.label === "top activations" ? `top activations (${group.n})` :
        `interval ${number(group.low)} \u2013 ${number(group.high)} \u00b7 ${percent(group.share)} of activations ` +
        `\u00b7 ${group.n} samples`;
      section.append(element("h4", null, label));
      if (group.n === 0) section.append(element("div", "nm-sae-empty", "no activations"));
      for (let c = 0; c < group.n; c++, at++) {
        const context = info.contexts[at];
        section.append(contextLine(context, at, offset, info, arrays, texts));
        offset += context.n;
      }
      groups.append(section);
    }
    dash.replaceChildren(header, top, tokenBox, groups);
    el.dataset.ready = String(info.latent);
  }

  function contextLine(context, index, offset, info, arrays, texts) {
    const line = ownKeys(element("div", "nm-sae-context"));
    line.dataset.context = String(index);
    line.tabIndex = 0;
    line.setAttribute("role", "group");
    const value = element("span", "nm-sae-value", number(context.value));
    const where = context.position >= 0 ? `sequence ${context.sequence}, position ${context.position}` :
      `document ${context.sequence}`;
    value.title = where;
    line.setAttribute("aria-label", `context ${index + 1}, activation ${number(context.value)}, ${where}: Enter lists ` +
      "the latents most active on its top token, the arrow keys move between its tokens");
    const strip = element("span", "nm-sae-tokens");
    for (let j = 0; j < context.n; j++) {
      const id = arrays.ctx_ids[offset + j];
      const act = arrays.ctx_acts[offset + j];
      const text = texts[id] ?? String(id);
      const span = ownKeys(element("span", "nm-sae-token", shown(text)));
      span.tabIndex = -1;
      const rgb = shade(act, info.max);
      span.style.background = `rgb(${rgb.join(",")})`;
      span.style.color = textOn(rgb);
      span.dataset.at = String(offset + j);
      span.dataset.act = String(act);
      span.title = `\u201c${text}\u201d \u00b7 activation ${number(act)}`;
      if (j === context.marked) span.classList.add("nm-sae-mark");
      strip.append(span);
    }
    line.append(value, strip);
    return line;
  }

  // The latents most active on a clicked token, each opening its dashboard.
  function pick(at) {
    const { head: info, arrays } = state.dash;
    const box = dash.querySelector(".nm-sae-picked");
    const text = info.texts[arrays.ctx_ids[at]] ?? String(arrays.ctx_ids[at]);
    state.picked = at;
    for (const span of dash.querySelectorAll(".nm-sae-token.nm-sae-picked-token")) span.classList.remove("nm-sae-picked-token");
    const span = dash.querySelector(`.nm-sae-token[data-at="${at}"]`);
    if (span) {
      span.classList.add("nm-sae-picked-token");
      span.closest(".nm-sae-context").after(box); // the list opens under the line of the token clicked
    }
    const heading = element("div", "nm-sae-picked-head", `latents most active on \u201c${shown(text)}\u201d`);
    const list = element("div", "nm-sae-features");
    const available = model.get("available");
    for (let k = 0; k < info.m; k++) {
      const latent = arrays.tok_ids[at * info.m + k];
      if (latent === info.none) continue;
      const button = ownKeys(element("button", "nm-sae-feature", `latent ${latent} \u00b7 ${number(arrays.tok_vals[at * info.m + k])}`));
      button.type = "button";
      button.dataset.latent = String(latent);
      if (available && !available.includes(latent)) {
        button.classList.add("nm-sae-absent");
        button.title = "not embedded in this static view";
      }
      list.append(button);
    }
    if (!list.children.length) list.append(element("span", "nm-sae-empty", info.m ? "no latent fires here" :
      "these statistics kept no latents per token (token_features=0)"));
    const close = ownKeys(element("button", "nm-sae-close", "\u00d7"));
    close.type = "button";
    close.setAttribute("aria-label", "close");
    box.replaceChildren(close, heading, list);
  }

  // The keyboard does what the mouse does: a context line takes the focus (Tab), the arrow keys move it along its
  // tokens, and Enter or Space lists the latents most active on the focused token (the top one, from the line).
  dash.addEventListener("keydown", (event) => {
    const line = event.target.closest(".nm-sae-context");
    if (!line) return;
    const tokens = [...line.querySelectorAll(".nm-sae-token")];
    const token = event.target.closest(".nm-sae-token") || line.querySelector(".nm-sae-mark");
    const at = tokens.indexOf(token);
    if (event.key === "Enter" || event.key === " ") pick(Number(token.dataset.at));
    else if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      const next = tokens[Math.min(tokens.length - 1, Math.max(0, at + (event.key === "ArrowRight" ? 1 : -1)))];
      next.focus();
    } else return;
    event.preventDefault();
  });

  dash.addEventListener("click", (event) => {
    const token = event.target.closest(".nm-sae-token");
    if (token) return pick(Number(token.dataset.at));
    const feature = event.target.closest(".nm-sae-feature");
    if (feature) return open(Number(feature.dataset.latent));
    if (event.target.closest(".nm-sae-close")) dash.querySelector(".nm-sae-picked").replaceChildren();
  });

  function histogram(info, counts) {
    const width = 300, height = 80, bins = counts.length;
    const figure = element("figure", "nm-sae-hist");
    const plot = svgElement("svg", { width, height: height + 16, viewBox: `0 0 ${width} ${height + 16}`, role: "img" });
    plot.setAttribute("aria-label", `activation histogram of latent ${info.latent} over the tokens where it fires`);
    const top = Math.max(1, ...counts);
    const step = width / bins;
    counts.forEach((c, k) => {
      if (!c) return;
      const h = (c / top) * height;
      const bar = svgElement("rect", { x: (k * step).toFixed(1), y: (height - h).toFixed(1), width: Math.max(step - 0.5, 0.5).toFixed(1), height: h.toFixed(1) });
      const hint = svgElement("title");
      const low = (k / bins) * info.hist_top, high = ((k + 1) / bins) * info.hist_top;
      hint.textContent = `${number(low)} \u2013 ${number(high)}: ${c} tokens`;
      bar.append(hint);
      plot.append(bar);
    });
    const peak = info.hist_top > 0 ? (info.max / info.hist_top) * width : 0;
    const marker = svgElement("line", { x1: peak.toFixed(1), y1: 0, x2: peak.toFixed(1), y2: height, class: "nm-sae-max" });
    const markerHint = svgElement("title");
    markerHint.textContent = `max ${number(info.max)}`;
    marker.append(markerHint);
    const axis = svgElement("line", { x1: 0, y1: height + 0.5, x2: width, y2: height + 0.5, class: "nm-sae-axis" });
    const left = svgElement("text", { x: 0, y: height + 13 });
    left.textContent = "0";
    const right = svgElement("text", { x: width, y: height + 13, "text-anchor": "end" });
    right.textContent = number(info.hist_top);
    plot.append(marker, axis, left, right);
    figure.append(plot, element("figcaption", null,
      `activations where it fires, 0 to ${number(info.hist_top)} (tallest bar ${top} tokens; line: max ${number(info.max)})`));
    return figure;
  }

  function logits(info, arrays, texts) {
    const box = element("div", "nm-sae-logits");
    if (!info.logits) {
      box.append(element("div", "nm-sae-empty", "no logit effects (statistics from a store without model=, or a hook with no path to the unembedding)"));
      return box;
    }
    const largest = Math.max(1e-12, ...arrays.top_vals.map(Math.abs), ...arrays.bottom_vals.map(Math.abs));
    for (const [side, label] of [["top", "promotes"], ["bottom", "suppresses"]]) {
      const column = element("div", `nm-sae-logit nm-sae-${label}`);
      column.append(element("div", "nm-sae-logit-head", label));
      const ids = arrays[`${side}_ids`], values = arrays[`${side}_vals`];
      for (let k = 0; k < ids.length; k++) {
        const line = element("div", "nm-sae-logit-line");
        const bar = element("span", "nm-sae-bar");
        bar.style.width = `${Math.round((Math.abs(values[k]) / largest) * 48)}px`;
        line.append(bar, element("span", "nm-sae-logit-token", shown(texts[ids[k]] ?? String(ids[k]))),
          element("span", "nm-sae-logit-value", (values[k] >= 0 ? "+" : "") + number(values[k])));
        column.append(line);
      }
      box.append(column);
    }
    return box;
  }

  // --- data arriving ---

  async function loadList() {
    const data = model.get("list_data");
    if (!browsing || !data || !asBytes(data).length) return;
    const list = readBlob(await inflate(data));
    if (state.disposed) return;
    state.list = list;
    state.sort = state.sort || (list.head.order === "index" ? "latent" : list.head.order);
    state.descending = state.sort !== "latent";
    drawHead();
    drawRows();
    el.dataset.list = String(list.head.n);
  }

  async function loadPayload() {
    const key = model.get("payload_key");
    const data = model.get("payload");
    if (!data || !asBytes(data).length || key < 0) {
      drawDashboard();
      return;
    }
    const parsed = readBlob(await inflate(data));
    if (state.disposed || key !== model.get("payload_key")) return;
    state.dash = parsed;
    drawDashboard();
  }

  const listeners = {
    "change:payload": () => { loadPayload(); },
    "change:error": () => drawDashboard(),
    "change:list_data": () => { loadList(); },
    "change:note": () => { note.textContent = model.get("note"); },
  };
  for (const [event, callback] of Object.entries(listeners)) model.on(event, callback);
  loadList();
  loadPayload();
  return () => {
    state.disposed = true;
    for (const [event, callback] of Object.entries(listeners)) model.off(event, callback);
  };
}

// The static view's stand-in for the widget model: the same get/set/save_changes/on, backed by embedded data.
// `list` is the table's blob and `features` the embedded dashboards' blobs by latent (deflated, base64); asking for
// a latent swaps in its blob, as the kernel would, or an error naming how to see it.
function staticModel(data) {
  const available = Object.keys(data.features).map(Number);
  const state = {
    mode: data.mode, title: data.title, note: data.note, list_data: data.list ? decodeBase64(data.list) : null,
    feature: -1, payload: null, payload_key: -1, error: "", available,
  };
  const model = localModel(state, (key) => { if (key === "feature") choose(state.feature); });
  const choose = (latent) => {
    const text = data.features[String(latent)];
    if (text) {
      Object.assign(state, { payload: decodeBase64(text), payload_key: latent, error: "" });
      model.changed.add("payload");
    } else {
      state.error = `latent ${latent} is not embedded in this static view: browser(features=[${latent}, ...]) ` +
        "embeds it, and the live widget opens any latent";
    }
    model.changed.add("error");
  };
  if (data.open !== null && data.open !== undefined) {
    state.feature = data.open;
    choose(data.open);
  }
  model.changed.clear();
  return model;
}

export default { render };
