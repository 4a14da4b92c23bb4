// Lookalike search page: plain JavaScript, no build step, no dependencies, nothing from the network
// but this service. State lives in the URL (?similar=<id>&k=&category=&filter=) and in the history
// entries (a photo search cannot be put in a URL: its answer is kept in memory for the back button).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const base = location.pathname.replace(/[^/]*$/, "");  // where this page (and the API) lives
  const views = new Map();  // history key -> {kind, data, photo}
  let counter = 0;
  let current = null;       // the view shown: {kind, id?, photo?}
  const emptyView = $("empty");

  // ------------------------------------------------------------------ helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  }

  // A product id as one path segment: "/" as %2F, an id of dots as %2E (clients collapse "." and "..").
  function pathId(id) {
    return /^\.+$/.test(id) ? id.replace(/\./g, "%2E") : encodeURIComponent(id);
  }

  function token() { return sessionStorage.getItem("lookalike-token") || ""; }
  function authHeaders() { return token() ? { Authorization: "Bearer " + token() } : {}; }

  function options() {
    const k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 10));
    return { k, category: $("category").value, filter: $("filter").value.trim() };
  }

  function params(extra) {
    const o = options();
    const p = new URLSearchParams(extra || {});
    p.set("k", String(o.k));
    if (o.category) p.set("category", o.category);
    if (o.filter) p.set("filter", o.filter);  // only when non-empty
    return p;
  }

  function setOptions(search) {
    const p = new URLSearchParams(search);
    if (p.get("k")) $("k").value = p.get("k");
    if (p.has("category")) ensureCategory(p.get("category"));
    $("filter").value = p.get("filter") || "";
  }

  function ensureCategory(name) {
    const select = $("category");
    if (name && ![...select.options].some((o) => o.value === name)) select.append(el("option", { value: name, text: name }));
    select.value = name || "";
  }

  function say(text, kind) {
    const m = $("message");
    m.textContent = text || "";
    m.className = "message" + (kind ? " " + kind : "");
    m.setAttribute("role", kind === "error" ? "alert" : "status");
    document.body.dataset.state = kind === "error" ? "error" : kind === "busy" ? "loading" : "ready";
  }

  class ApiFailure extends Error {
    constructor(status, body, retryAfter) {
      super(body && body.error ? body.error : "HTTP " + status);
      this.status = status; this.body = body; this.retryAfter = retryAfter;
    }
  }

  async function api(path, init) {
    let resp;
    try {
      resp = await fetch(base + path, { ...(init || {}), headers: { ...authHeaders(), ...((init || {}).headers || {}) } });
    } catch (e) {
      throw new ApiFailure(0, null, null);
    }
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) throw new ApiFailure(resp.status, body, resp.headers.get("Retry-After"));
    return body;
  }

  // What a person should read for each failure (the service's own message is kept where it helps).
  function explain(err) {
    const said = err.body && err.body.error ? err.body.error : "";
    switch (err.status) {
      case 0: return "Could not reach the search service. Is it running?";
      case 400: return said || "The request was refused (400).";
      case 401: return "This service needs an API token: open \u201cAPI token\u201d under the options, paste it and try again.";
      case 404: return said.startsWith("unknown product_id") ? "No such product: " + said.replace(/^unknown product_id /, "") : said || "Not found.";
      case 413: return "That photo is too large for this service (" + said + "). Try a smaller one.";
      case 415: return "That file is not an image the service can read (JPEG, PNG, WebP, GIF, BMP or TIFF).";
      case 422: return "The service could not read the request: " + (said || "malformed") + ".";
      case 503: return (said.startsWith("busy") ? "The service is busy" : "The index is not ready yet") +
        " (" + said + "). Try again" + (err.retryAfter ? " in " + err.retryAfter + " s." : " shortly.");
      case 504: return "The service took too long to answer. Try again.";
      default: return "Something went wrong (" + err.status + (said ? ": " + said : "") + ").";
    }
  }

  // ------------------------------------------------------------------ version and categories

  async function loadVersion() {
    try {
      const v = await api("version");
      const total = Object.values(v.counts || {}).reduce((a, b) => a + b, 0);
      $("version").textContent = "index " + v.index_version + " \u00b7 model " + v.model_version + " \u00b7 " +
        total.toLocaleString() + " items" + (v.built_at ? " \u00b7 built " + v.built_at.replace("T", " ").replace("Z", " UTC") : "");
      const select = $("category"), chosen = select.value;
      for (const name of Object.keys(v.counts || {}).sort()) ensureCategory(name);
      select.value = chosen;
    } catch (err) {
      $("version").textContent = err.status === 401 ? "version: needs an API token" : "version unknown (" + explain(err) + ")";
    }
  }

  // ------------------------------------------------------------------ thumbnails and cards

  function thumbnail(id, alt) {
    const img = el("img", { alt, loading: "lazy", decoding: "async", width: "160", height: "160" });
    const missing = () => img.replaceWith(el("span", { class: "missing", text: "no picture" }));
    img.addEventListener("error", missing, { once: true });
    if (token()) {  // an <img> cannot send the bearer token: fetch it, show it from a blob
      fetch(base + "thumb/" + pathId(id), { headers: authHeaders() })
        .then((r) => (r.ok ? r.blob() : Promise.reject(r.status)))
        .then((b) => { img.src = URL.createObjectURL(b); }, missing);
    } else {
      img.src = base + "thumb/" + pathId(id);
    }
    return img;
  }

  function card(r) {
    const name = r.title || r.product_id;
    const score = typeof r.score === "number" ? r.score : null;
    const href = "?" + params({ similar: r.product_id }).toString();
    return el("li", { class: "card" },
      el("a", {
        href, "data-id": r.product_id,
        "aria-label": name + (r.title ? " (" + r.product_id + ")" : "") + (score !== null ? ", similarity " + score.toFixed(3) : "") + ": show its lookalikes",
        onclick: (e) => {
          if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;  // new tab etc. as usual
          e.preventDefault();
          showSimilar(r.product_id, true);
        },
      },
      el("span", { class: "thumb" }, thumbnail(r.product_id, "Picture of " + name)),
      el("span", { class: "text" },
        el("span", { class: "title", text: name }),
        r.title ? el("span", { class: "pid", text: r.product_id }) : null,
        score !== null ? el("span", { class: "score", text: "score " + score.toFixed(3) }) : null,
        score !== null ? el("span", { class: "meter", "aria-hidden": "true" },
          el("span", { style: null })) : null)));
  }

  function cards(results) {
    if (!results || !results.length) return el("p", { class: "none", text: "No lookalikes (nothing matches the filter?)." });
    const list = el("ul", { class: "cards" }, results.map(card));
    // meter widths set through the CSSOM (the page's policy allows no inline style attributes)
    list.querySelectorAll(".meter > span").forEach((bar, i) => {
      bar.style.width = Math.max(0, Math.min(1, results[i].score)) * 100 + "%";
    });
    return list;
  }

  // ------------------------------------------------------------------ the two views

  function objectLabel(o) {
    if (o.score === null || o.score === undefined) return o.category ? "whole photo in " + o.category : "whole photo";
    return o.category + " " + o.score.toFixed(2);
  }

  function renderSearch(data, photo) {
    const frame = el("div", { class: "frame" });
    const img = el("img", { src: photo.url, alt: "Your photo" + (photo.name ? " (" + photo.name + ")" : "") + ": " +
      data.objects.length + " item" + (data.objects.length === 1 ? "" : "s") + " searched" });
    frame.append(img);
    const caption = el("figcaption", { text: data.detected ? data.detected + " object" + (data.detected === 1 ? "" : "s") +
      " found by the detector (" + data.detector + ")" : "no objects found: the whole photo was searched" });
    const figure = el("figure", { class: "photo" }, frame, caption);
    const rows = el("div", { class: "rows" });
    const rects = [];
    data.objects.forEach((o, i) => {
      const id = "object-" + (i + 1);
      const note = [];
      if (o.searched && o.searched.length > 1) note.push("searched in " + o.searched.join(" + "));
      if (o.alternatives && o.alternatives.length) note.push("or " + o.alternatives.map((a) => a.category + " " + a.score.toFixed(2)).join(", "));
      const section = el("section", { class: "object", "aria-labelledby": id + "-h" },
        el("h2", { id: id + "-h" }, el("span", { class: "badge", "aria-hidden": "true", text: String(i + 1) }),
          el("span", { text: "Item " + (i + 1) + ": " + objectLabel(o) }),
          note.length ? el("span", { class: "note", text: "(" + note.join("; ") + ")" }) : null),
        cards(o.results));
      section.addEventListener("mouseenter", () => rects[i] && rects[i].classList.add("active"));
      section.addEventListener("mouseleave", () => rects[i] && rects[i].classList.remove("active"));
      section.addEventListener("focusin", () => rects[i] && rects[i].classList.add("active"));
      section.addEventListener("focusout", () => rects[i] && rects[i].classList.remove("active"));
      rows.append(section);
    });
    const draw = () => {  // boxes in the upload's pixels: an SVG over the photo with the same viewBox
      const w = img.naturalWidth, h = img.naturalHeight;
      if (!w || !h) return;
      const layer = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", "aria-hidden": "true" });
      data.objects.forEach((o, i) => {
        const [x0, y0, x1, y1] = o.box;
        const r = svg("rect", { x: x0, y: y0, width: Math.max(1, x1 - x0), height: Math.max(1, y1 - y0), rx: 2 });
        rects[i] = r;
        layer.append(r);
      });
      frame.append(layer);
      data.objects.forEach((o, i) => {
        const [x0, y0] = o.box;
        const tag = el("span", { class: "tag" + (y0 / h < 0.08 ? " inside" : ""), text: (i + 1) + " " + objectLabel(o) });
        tag.style.left = (x0 / w) * 100 + "%";
        tag.style.top = (y0 / h) * 100 + "%";
        frame.append(tag);
      });
    };
    img.complete ? draw() : img.addEventListener("load", draw, { once: true });
    return el("div", { class: "view search-view", "data-version": data.index_version }, figure, rows);
  }

  function renderSimilar(data) {
    const name = data.title || data.product_id;
    const figure = el("figure", { class: "photo" },
      el("div", { class: "frame" }, thumbnail(data.product_id, "Picture of " + name)),
      el("figcaption", {}, el("strong", { text: name }), el("br"),
        el("span", { text: data.product_id + " \u00b7 " + data.category })));
    const section = el("section", { class: "object", "aria-labelledby": "similar-h" },
      el("h2", { id: "similar-h", text: "Lookalikes of " + name }), cards(data.results));
    return el("div", { class: "view similar-view", "data-version": data.index_version, "data-product": data.product_id },
      figure, el("div", { class: "rows" }, section));
  }

  function show(entry) {
    const results = $("results");
    results.replaceChildren(entry.kind === "search" ? renderSearch(entry.data, entry.photo) : renderSimilar(entry.data));
    current = entry;
    results.focus({ preventScroll: true });
    if (window.matchMedia("(max-width: 760px)").matches) $("message").scrollIntoView({ block: "start" });
    else if (entry.kind === "similar") window.scrollTo(0, 0);
  }

  function remember(entry, push, url) {
    const key = "v" + Date.now().toString(36) + "-" + (counter++);
    views.set(key, entry);
    history[push ? "pushState" : "replaceState"]({ key }, "", url);
  }

  // ------------------------------------------------------------------ actions

  async function showSimilar(id, push) {
    if (!id) return;
    say("Finding lookalikes of " + id + "\u2026", "busy");
    try {
      const data = await api("similar/" + pathId(id) + "?" + params().toString());
      const entry = { kind: "similar", id, data };
      remember(entry, push, "?" + params({ similar: id }).toString());
      show(entry);
      $("product").value = id;
      say(data.results.length + " lookalikes of " + (data.title || id) + " (index " + data.index_version + ")");
    } catch (err) {
      say(explain(err), "error");
    }
  }

  async function searchPhoto(file, push) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) { say("That file is not an image.", "error"); return; }
    const photo = { url: URL.createObjectURL(file), name: file.name || "pasted image", file };
    say("Searching with " + photo.name + "\u2026", "busy");
    const form = new FormData();
    form.append("image", file, file.name || "photo");
    try {
      const data = await api("search?" + params().toString(), { method: "POST", body: form });
      const entry = { kind: "search", data, photo };
      remember(entry, push, "?" + params({ view: "photo" }).toString());
      show(entry);
      const n = data.objects.reduce((a, o) => a + o.results.length, 0);
      say(data.objects.length + " item" + (data.objects.length === 1 ? "" : "s") + " searched, " + n +
        " lookalikes (index " + data.index_version + ")");
    } catch (err) {
      say(explain(err), "error");
    }
  }

  function rerun() {  // the options changed: the same query again, in place
    if (!current) return;
    if (current.kind === "similar") showSimilar(current.id, false);
    else searchPhoto(current.photo.file, false);
  }

  function restore() {  // back / forward, or a fresh load of a URL
    const key = history.state && history.state.key;
    const p = new URLSearchParams(location.search);
    setOptions(location.search);
    if (key && views.has(key)) {
      const entry = views.get(key);
      show(entry);
      if (entry.kind === "similar") $("product").value = entry.id;
      say(entry.kind === "search" ? "Back to your photo's results." : "Lookalikes of " + (entry.data.title || entry.id) + ".");
      return;
    }
    if (p.get("similar")) { showSimilar(p.get("similar"), false); return; }
    if (p.get("view") === "photo") { say("Photos are not kept across reloads: drop it again."); }
    $("results").replaceChildren(emptyView);
    current = null;
  }

  // ------------------------------------------------------------------ wiring

  function firstImage(items) {
    for (const item of items || []) {
      const file = item.getAsFile ? (item.kind === "file" ? item.getAsFile() : null) : item;
      if (file && (!file.type || file.type.startsWith("image/"))) return file;
    }
    return null;
  }

  function init() {
    $("token").value = token();
    $("token").addEventListener("change", () => {
      sessionStorage.setItem("lookalike-token", $("token").value.trim());
      loadVersion();
    });
    $("pick").addEventListener("click", () => $("file").click());
    $("shoot").addEventListener("click", () => $("camera").click());
    for (const id of ["file", "camera"]) {
      $(id).addEventListener("change", (e) => { searchPhoto(e.target.files[0], true); e.target.value = ""; });
    }
    const drop = $("drop");
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = firstImage(e.dataTransfer.files);
      file ? searchPhoto(file, true) : say("Drop an image file.", "error");
    });
    window.addEventListener("dragover", (e) => e.preventDefault());  // a miss does not open the file instead
    window.addEventListener("drop", (e) => e.preventDefault());
    document.addEventListener("paste", (e) => {
      const file = firstImage(e.clipboardData && e.clipboardData.items);
      if (file) { e.preventDefault(); searchPhoto(file, true); }
    });
    $("by-id").addEventListener("submit", (e) => { e.preventDefault(); showSimilar($("product").value.trim(), true); });
    $("options").addEventListener("submit", (e) => { e.preventDefault(); rerun(); });
    $("k").addEventListener("change", rerun);
    $("category").addEventListener("change", rerun);
    $("filter").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); rerun(); } });
    window.addEventListener("popstate", restore);
    loadVersion();
    restore();
    if (!document.body.dataset.state) document.body.dataset.state = "ready";
  }

  init();
})();
