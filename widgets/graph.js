// NeuronMap layered-graph view (circuit graphs, attribution graphs). One module renders both views: the live
// anywidget view (model = the widget's model) and the static HTML view (model = staticModel(data)). The attention
// viewer's module is bundled in front of this one as `attentionView` (see widget.front_end), so a head's pattern
// opens in the very viewer that attention patterns use.
//
// Model fields: title, description, note, extra_html (HTML the library wrote and escaped: the faithfulness table),
// row_labels (bottom up), nodes ([{id, label, row, column, title, head: [layer, head] | null}]), edge_values
// (float32 per edge, strongest |value| first), edge_ends (int32 [edge, 2]: source and target node indices),
// edge_ports (uint8 per edge: 0 none, 1 query, 2 key, 3 value input), k (edges drawn at first), colours
// ({positive, negative}); live only: attention ("IPY_MODEL_<id>" of an attention widget, once a head was asked
// for), head_request ("layer.head": the kernel answers with `attention`), attention_error. Every label reaches the
// page through textContent or an SVG text node, never as markup.

import { asBytes, decodeBase64, element, svgElement, ownKeys } from "./common.js";

const NODE_WIDTH = 46, NODE_HEIGHT = 20, COLUMN = 58, ROW = 64, MARGIN = 14, LABEL_WIDTH = 64;
const PORTS = { 1: [-0.3, "none", "query"], 2: [0, "5 3", "key"], 3: [0.3, "1.5 2.5", "value"] };
const MAX_DRAWN = 3000;
const SLIDER_STEPS = 1000;

// Typed arrays need aligned offsets: copy the bytes out when they are not.
function typed(Type, view) {
  const bytes = asBytes(view);
  const aligned = bytes.byteOffset % Type.BYTES_PER_ELEMENT === 0 ? bytes : bytes.slice();
  return new Type(aligned.buffer, aligned.byteOffset, aligned.byteLength / Type.BYTES_PER_ELEMENT);
}

const formatValue = (value) => (value >= 0 ? "+" : "") + Number(value.toPrecision(4));

function render({ model, el }) {
  el.classList.add("nm-graphview");
  const nodes = model.get("nodes");
  const values = typed(Float32Array, model.get("edge_values"));
  const ends = typed(Int32Array, model.get("edge_ends"));
  const ports = asBytes(model.get("edge_ports"));
  const n = values.length;
  const colours = model.get("colours");
  const state = { selected: null, x: 0, y: 0, scale: 1, drag: null, attention: null, cleanup: null, disposed: false };

  const rows = 1 + Math.max(0, ...nodes.map((node) => node.row));
  const columns = 1 + Math.max(0, ...nodes.map((node) => node.column));
  const width = Math.round(LABEL_WIDTH + columns * COLUMN + 2 * MARGIN);
  const height = rows * ROW + 2 * MARGIN;
  const place = nodes.map((node) => [
    MARGIN + LABEL_WIDTH + node.column * COLUMN + COLUMN / 2,
    MARGIN + (rows - 1 - node.row) * ROW + ROW / 2,
  ]);

  const header = element("div", "nm-graph-title", model.get("title"));
  const description = element("div", "nm-graph-desc", model.get("description"));
  const bar = element("div", "nm-bar");
  const kLabel = element("label", null, "strongest edges ");
  const kSlider = ownKeys(element("input", "nm-k"));
  Object.assign(kSlider, { type: "range", min: "0", max: String(SLIDER_STEPS), step: "1" });
  const kShown = element("span", "nm-k-value");
  kLabel.append(kSlider, kShown);
  const thresholdLabel = element("label", null, "min |score| ");
  const threshold = ownKeys(element("input", "nm-threshold"));
  Object.assign(threshold, { type: "number", min: "0", step: "any", value: "0" });
  thresholdLabel.append(threshold);
  const fit = ownKeys(element("button", "nm-fit", "fit"));
  fit.type = "button";
  fit.title = "show the whole graph (scroll to zoom, drag to pan)";
  const count = element("span", "nm-count");
  bar.append(kLabel, thresholdLabel, fit, count);

  const box = element("div", "nm-graph-box");
  const svg = svgElement("svg", { class: "nm-graph-svg", role: "img", "aria-label": model.get("title") });
  const view = svgElement("g", { class: "nm-view" });
  const rowLayer = svgElement("g", { class: "nm-rows" });
  const edgeLayer = svgElement("g", { class: "nm-edges" });
  const nodeLayer = svgElement("g", { class: "nm-nodes" });
  view.append(rowLayer, edgeLayer, nodeLayer);
  svg.append(view);
  box.append(svg);
  const info = element("div", "nm-info", "hover an edge or a node; click a node to highlight its inputs and outputs" +
    (nodes.some((node) => node.head) ? ", a head to see its attention pattern" : ""));
  info.setAttribute("aria-live", "polite");
  const legend = element("div", "nm-graph-note");
  const extra = element("div", "nm-extra");
  extra.innerHTML = model.get("extra_html") || "";  // the library's own escaped HTML (a table of numbers)
  const panel = element("div", "nm-attn-panel");
  const note = element("div", "nm-graph-note", model.get("note"));
  el.append(header, description, bar, box, info, legend, extra, panel, note);
  if (!model.get("description")) description.remove();

  // The slider moves k on a log scale, so both the few strongest edges and thousands are in reach.
  const most = Math.max(1, Math.min(n, MAX_DRAWN));
  const kAt = (step) => Math.max(1, Math.round(Math.exp((Number(step) / SLIDER_STEPS) * Math.log(most))));
  const stepOf = (k) => Math.round((Math.log(Math.max(1, k)) / Math.log(most || 2)) * SLIDER_STEPS) || 0;
  kSlider.value = String(most > 1 ? stepOf(Math.min(model.get("k"), most)) : SLIDER_STEPS);

  rowLayer.append(...model.get("row_labels").slice(0, rows).map((label, row) => {
    const text = svgElement("text", { class: "nm-graph-row", x: 4, y: MARGIN + (rows - 1 - row) * ROW + ROW / 2 + 4 });
    text.textContent = label;
    return text;
  }));
  nodeLayer.append(...nodes.map((node, index) => {
    const [x, y] = place[index];
    const group = ownKeys(svgElement("g", { class: "nm-node", tabindex: 0, role: "button", "data-id": node.id }));
    group.dataset.index = String(index);
    group.setAttribute("aria-label", node.title || node.label);
    const title = svgElement("title");
    title.textContent = node.title || node.label;
    const rect = svgElement("rect", { x: x - NODE_WIDTH / 2, y: y - NODE_HEIGHT / 2, width: NODE_WIDTH, height: NODE_HEIGHT, rx: 4 });
    const label = svgElement("text", { x, y: y + 4, "text-anchor": "middle" });
    label.textContent = node.label;
    group.append(title, rect, label);
    if (node.head) group.classList.add("nm-head-node");
    return group;
  }));

  function edgeName(i) {
    const port = PORTS[ports[i]];
    return `${nodes[ends[2 * i]].id} \u2192 ${nodes[ends[2 * i + 1]].id}${port ? "." + port[2][0] : ""}`;
  }

  function drawn() {
    const k = kAt(kSlider.value);
    const floor = Math.max(0, Number(threshold.value) || 0);
    let m = 0;
    while (m < Math.min(k, n) && Math.abs(values[m]) >= floor) m++;
    return m;
  }

  function drawEdges() {
    const m = drawn();
    const largest = Math.abs(values[0]) || 1;
    const paths = [];
    for (let i = m - 1; i >= 0; i--) {  // strongest drawn last, on top
      const [x1, y1] = place[ends[2 * i]];
      const [tx, ty] = place[ends[2 * i + 1]];
      const [offset, dashes] = PORTS[ports[i]] || [0, "none"];
      const top = y1 - NODE_HEIGHT / 2, x2 = tx + offset * NODE_WIDTH, y2 = ty + NODE_HEIGHT / 2;
      const bend = Math.max(Math.abs(y2 - top) / 2, 12);
      const strength = Math.abs(values[i]) / largest;
      const path = svgElement("path", {
        class: "nm-edge",
        d: `M${x1},${top} C${x1},${top - bend} ${x2},${y2 + bend} ${x2},${y2}`,
        stroke: values[i] >= 0 ? colours.positive : colours.negative,
        "stroke-width": (0.6 + 5.4 * strength).toFixed(2),
        "stroke-opacity": (0.25 + 0.7 * strength).toFixed(2),
        "stroke-dasharray": dashes,
      });
      path.dataset.index = String(i);
      const title = svgElement("title");
      title.textContent = `${edgeName(i)}: ${formatValue(values[i])}`;
      path.append(title);
      paths.push(path);
    }
    edgeLayer.replaceChildren(...paths);
    kShown.textContent = ` ${Math.min(kAt(kSlider.value), n)}`;
    const cut = m < n ? ` (|score| \u2265 ${m ? Math.abs(values[m - 1]).toPrecision(3) : "\u2013"})` : "";
    count.textContent = `drawing ${m.toLocaleString("en")} of ${n.toLocaleString("en")} edges${cut}`;
    el.dataset.drawn = String(m);
    highlight();
  }

  function highlight() {
    const chosen = state.selected;
    for (const group of nodeLayer.children) group.classList.toggle("nm-selected", Number(group.dataset.index) === chosen);
    let inputs = 0, outputs = 0;
    for (const path of edgeLayer.children) {
      const i = Number(path.dataset.index);
      const into = ends[2 * i + 1] === chosen, from = ends[2 * i] === chosen;
      inputs += into;
      outputs += from;
      path.classList.toggle("nm-hi", chosen !== null && (into || from));
      path.classList.toggle("nm-dim", chosen !== null && !into && !from);
    }
    if (chosen !== null) {
      info.textContent = `${nodes[chosen].title || nodes[chosen].label}: ${inputs} input and ${outputs} output edges drawn`;
    }
  }

  function select(index) {
    state.selected = state.selected === index ? null : index;
    highlight();
    const node = state.selected === null ? null : nodes[state.selected];
    if (node && node.head) openHead(node.head[0], node.head[1]);
  }

  // The attention panel: the attention viewer on the head's layer with that head chosen.
  function showAttention(attentionModel, layer, head) {
    if (state.cleanup) state.cleanup();
    const layers = attentionModel.get("layers");
    if (!layers.includes(layer)) {
      panel.replaceChildren(element("div", "nm-graph-note", `layer ${layer}'s attention is not embedded in this page ` +
        `(embedded: ${layers.join(", ") || "none"}); view(patterns=..., budget=...) embeds more`));
      return;
    }
    attentionModel.set("layer", layer);
    attentionModel.set("heads", [head]);
    attentionModel.save_changes();
    const heading = element("div", "nm-attn-heading", `attention of head ${layer}.${head}`);
    const close = ownKeys(element("button", "nm-attn-close", "close"));
    close.type = "button";
    close.addEventListener("click", () => {
      if (state.cleanup) state.cleanup();
      state.cleanup = null;
      panel.replaceChildren();
    });
    heading.append(" ", close);
    const holder = element("div");
    panel.replaceChildren(heading, holder);
    state.cleanup = attentionView.render({ model: attentionModel, el: holder });
  }

  async function openHead(layer, head) {
    if (model.attentionModel) {  // the static page's embedded patterns (or none)
      const embedded = model.attentionModel();
      if (embedded) showAttention(embedded, layer, head);
      else panel.replaceChildren(element("div", "nm-graph-note", model.get("attention_error")));
      return;
    }
    state.wanted = [layer, head];
    if (model.get("attention")) return showLive();
    panel.replaceChildren(element("div", "nm-graph-note", `computing the attention patterns for head ${layer}.${head}\u2026`));
    model.set("head_request", `${layer}.${head}`);
    model.save_changes();
  }

  async function showLive() {
    const reference = model.get("attention");
    if (!reference || !state.wanted || state.disposed) return;
    const child = await model.widget_manager.get_model(reference.replace(/^IPY_MODEL_/, ""));
    if (!state.disposed) showAttention(child, ...state.wanted);
  }

  function onAttentionError() {
    if (model.get("attention_error")) panel.replaceChildren(element("div", "nm-graph-note", model.get("attention_error")));
  }

  // Pan and zoom: the view group's transform; the wheel zooms about the pointer, dragging the background pans.
  function transform() {
    view.setAttribute("transform", `translate(${state.x.toFixed(1)} ${state.y.toFixed(1)}) scale(${state.scale.toFixed(4)})`);
    el.dataset.scale = state.scale.toFixed(4);
  }

  function fitView() {
    const available = box.clientWidth || width;
    state.scale = Math.min(1, available / width);
    state.x = 0;
    state.y = 0;
    svg.setAttribute("height", String(Math.ceil(height * state.scale)));
    transform();
  }

  svg.setAttribute("width", "100%");
  svg.addEventListener("wheel", (event) => {
    event.preventDefault();
    const bounds = svg.getBoundingClientRect();
    const px = event.clientX - bounds.left, py = event.clientY - bounds.top;
    const scale = Math.min(8, Math.max(0.1, state.scale * Math.exp(-event.deltaY * 0.002)));
    state.x = px - ((px - state.x) * scale) / state.scale;
    state.y = py - ((py - state.y) * scale) / state.scale;
    state.scale = scale;
    transform();
  }, { passive: false });
  svg.addEventListener("pointerdown", (event) => {
    if (event.target.closest(".nm-node")) return;
    state.drag = { x: event.clientX, y: event.clientY, moved: false };
    svg.setPointerCapture(event.pointerId);
  });
  svg.addEventListener("pointermove", (event) => {
    if (!state.drag) return;
    const dx = event.clientX - state.drag.x, dy = event.clientY - state.drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 2) state.drag.moved = true;
    state.x += dx;
    state.y += dy;
    state.drag.x = event.clientX;
    state.drag.y = event.clientY;
    transform();
  });
  svg.addEventListener("pointerup", (event) => {
    const drag = state.drag;
    state.drag = null;
    if (drag && !drag.moved && state.selected !== null && !event.target.closest(".nm-node")) select(state.selected);
  });

  edgeLayer.addEventListener("mouseover", (event) => {
    const path = event.target.closest(".nm-edge");
    if (path) info.textContent = `edge ${edgeName(Number(path.dataset.index))}: score ${formatValue(values[Number(path.dataset.index)])}`;
  });
  nodeLayer.addEventListener("mouseover", (event) => {
    const group = event.target.closest(".nm-node");
    if (!group || state.selected !== null) return;
    const index = Number(group.dataset.index);
    let total = 0;
    for (let i = 0; i < n; i++) if (ends[2 * i + 1] === index) total += values[i];
    info.textContent = `${nodes[index].title || nodes[index].label} \u00b7 sum of its input edges' scores ${formatValue(total)}`;
  });
  nodeLayer.addEventListener("click", (event) => {
    const group = event.target.closest(".nm-node");
    if (group) select(Number(group.dataset.index));
  });
  nodeLayer.addEventListener("keydown", (event) => {
    const group = event.target.closest(".nm-node");
    if (!group || (event.key !== "Enter" && event.key !== " ")) return;
    event.preventDefault();
    select(Number(group.dataset.index));
  });
  kSlider.addEventListener("input", drawEdges);
  threshold.addEventListener("input", drawEdges);
  fit.addEventListener("click", fitView);

  const hasPorts = ports.some((port) => port > 0);
  legend.replaceChildren(
    ...[["\u2501", colours.positive, " positive \u00b7 "], ["\u2501", colours.negative, " negative \u00b7 "]].map(([mark, colour, text]) => {
      const span = element("span", null, mark);
      span.style.color = colour;
      const wrapper = element("span");
      wrapper.append(span, text);
      return wrapper;
    }),
    `width \u221d |score|, strongest first${hasPorts ? " \u00b7 into a head's query \u2501 (left), key \u254d (middle), value \u2508 (right)" : ""}` +
      " \u00b7 scroll to zoom, drag to pan",
  );

  const listeners = { "change:attention": () => { showLive(); }, "change:attention_error": onAttentionError };
  for (const [event, callback] of Object.entries(listeners)) model.on(event, callback);
  drawEdges();
  requestAnimationFrame(fitView);
  fitView();
  el.dataset.ready = "1";
  return () => {
    state.disposed = true;
    if (state.cleanup) state.cleanup();
    for (const [event, callback] of Object.entries(listeners)) model.off(event, callback);
  };
}

// The static view's stand-in for the widget model, backed by embedded data (bytes as base64 strings); the
// attention patterns it embeds (if any) are the attention viewer's own static model.
function staticModel(data) {
  const state = Object.assign({}, data);
  for (const key of ["edge_values", "edge_ends", "edge_ports"]) state[key] = decodeBase64(data[key]);
  let attention;
  return {
    get: (key) => state[key],
    set: (key, value) => { state[key] = value; },
    save_changes: () => {},
    on: () => {},
    off: () => {},
    attentionModel: () => {
      if (attention === undefined) attention = data.attention ? attentionView.staticModel(data.attention) : null;
      return attention;
    },
  };
}

export default { render };
