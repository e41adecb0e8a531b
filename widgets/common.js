// NeuronMap's helpers shared by the views: bytes from the kernel or the page, elements built without markup, keys kept
// from the notebook's shortcuts, token text made visible, text readable on a shaded background. Functions only, each
// with its comment above it: neuronmap.widget.front_end puts the ones a bundle's views import (and the ones those
// call) once in front of the views; `localModel` stands in for anywidget's model in static pages.

// The bytes behind a traitlets.Bytes value (a DataView in anywidget), an ArrayBuffer or a Uint8Array.
function asBytes(view) {
  if (!view) return new Uint8Array(0);
  if (view instanceof Uint8Array) return view;
  if (view instanceof ArrayBuffer) return new Uint8Array(view);
  return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}

// Bytes the kernel deflated (zlib format, neuronmap.widget.pack), inflated in the browser.
async function inflate(view) {
  const stream = new Blob([asBytes(view)]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// The bytes of base64 text embedded in a static page.
function decodeBase64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

// An HTML element; its text goes in as textContent, never as markup.
function element(tag, className, text) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text !== undefined) made.textContent = text;
  return made;
}

// An SVG element with `attributes` set (values as text).
function svgElement(tag, attributes) {
  const made = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes || {})) made.setAttribute(name, String(value));
  return made;
}

// Keys pressed on `target` are the view's: JupyterLab's and Notebook 7's shortcuts (Enter, Space, arrows in command
// mode) skip events whose target carries this attribute. Their selectors can match the focused element itself
// (`:focus`), so it goes on every focusable element, not only on the view's root.
function ownKeys(target) {
  target.setAttribute("data-lm-suppress-shortcuts", "true");
  return target;
}

// A token as it is shown: line breaks and tabs as visible marks.
function shown(token) {
  return token.replace(/\r\n|\n|\r/g, "\u21b5").replace(/\t/g, "\u21e5");
}

// WCAG 2 relative luminance of an sRGB colour given as 0-255 channels.
function luminance(rgb) {
  const linear = rgb.map((channel) => {
    const c = channel / 255;
    return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2];
}

// Black or white, whichever contrasts more with `rgb`: the better of the two is always at least 4.58:1.
function textOn(rgb) {
  const l = luminance(rgb);
  return (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) ? "#000" : "#fff";
}

// A stand-in for anywidget's model in a static page, backed by `state`: `set` marks the key changed and calls
// `react(key)`, where a view does what its kernel would (adding the keys that changed to `model.changed`);
// `save_changes` then fires the `change:<key>` listeners of every changed key, as anywidget does.
function localModel(state, react) {
  const listeners = {};
  const changed = new Set();
  return {
    changed,
    get: (key) => state[key],
    set: (key, value) => {
      state[key] = value;
      changed.add(key);
      react(key);
    },
    save_changes: () => {
      const keys = [...changed];
      changed.clear();
      for (const key of keys) for (const callback of listeners[`change:${key}`] || []) callback();
    },
    on: (event, callback) => { (listeners[event] = listeners[event] || []).push(callback); },
    off: (event, callback) => {
      listeners[event] = (listeners[event] || []).filter((c) => c !== callback);
    },
  };
}

export { asBytes, inflate, decodeBase64, element, svgElement, ownKeys, shown, textOn, localModel };
