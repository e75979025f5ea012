// zfvis explorer: the page. Plain JavaScript, no build step; it talks only to this server's API.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const TOKEN = params.get("token") || "";
  const S = { info: null, layers: [], grid: null, image: null, layer: null, channel: null, y: null, x: null,
              rule: "deconvnet", sort: "strongest", seq: 0, urls: [], notice: null };

  // ------------------------------------------------------------------ plumbing
  function api(path, query) {
    const q = new URLSearchParams(query || {});
    if (TOKEN) q.set("token", TOKEN);
    return path + "?" + q.toString();
  }
  async function call(path, query, options) {
    const r = await fetch(api(path, query), Object.assign({ headers: { "X-Zfvis-Token": TOKEN } }, options || {}));
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    return r;
  }
  const getJSON = async (path, query) => (await call(path, query)).json();
  function showError(err) {
    const box = $("error");
    if (!err) err = S.notice;  // a link's unknown name stays visible until the view changes
    if (!err) { box.hidden = true; return; }
    box.textContent = String(err.message || err);
    box.hidden = false;
  }
  const pct = (p) => p >= 0.995 ? (100 * p).toFixed(0) + "%" : p >= 0.001 ? (100 * p).toFixed(1) + "%" : "<0.1%";
  const fmt = (v) => (v === null || v === undefined) ? "" : (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2));
  function el(tag, attrs, kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
    }
    for (const kid of kids || []) e.appendChild(kid);
    return e;
  }
  const layerInfo = (name) => S.layers.find((l) => l.name === name);

  // ------------------------------------------------------------------ the address
  function writeURL(push) {
    const q = new URLSearchParams();
    if (TOKEN) q.set("token", TOKEN);
    for (const k of ["image", "layer", "channel", "y", "x", "rule", "sort"]) {
      if (S[k] !== null && S[k] !== undefined && !(k === "sort" && S.sort === "strongest")) q.set(k, S[k]);
    }
    const url = location.pathname + "?" + q.toString();
    if (url === location.pathname + location.search) return;
    if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
  }
  function readURL() {
    const q = new URLSearchParams(location.search);
    const int = (k) => (q.get(k) !== null && /^[0-9]{1,9}$/.test(q.get(k))) ? +q.get(k) : null;
    const images = S.info.images.map((i) => i.id), problems = [];
    const image = q.get("image"), layer = q.get("layer");
    if (image !== null && !images.includes(image)) problems.push(`no image '${image}' (uploads are forgotten when the server restarts)`);
    if (layer !== null && !layerInfo(layer)) problems.push(`no layer '${layer}' in this model`);
    for (const k of ["channel", "y", "x"]) if (q.get(k) !== null && int(k) === null) problems.push(`'${k}' must be a whole number, not '${q.get(k)}'`);
    S.image = images.includes(image) ? image : images[0] || null;
    S.layer = layerInfo(layer) ? layer : defaultLayer();
    S.channel = int("channel"); S.y = int("y"); S.x = int("x");
    const l = layerInfo(S.layer);
    if (S.channel !== null && l && l.shape.length && S.channel >= l.shape[0]) {
      problems.push(`channel ${S.channel} is out of range: ${S.layer} has ${l.shape[0]} (0..${l.shape[0] - 1})`);
      S.channel = null; S.y = null; S.x = null;
    }
    S.rule = ["deconvnet", "guided", "gradient", "all"].includes(q.get("rule")) ? q.get("rule") : "deconvnet";
    S.sort = q.get("sort") === "channel" ? "channel" : "strongest";
    S.notice = problems.length ? "The link names " + problems.join("; ") + `. Showing ${S.image}, ${S.layer} instead; the layers are listed ${matchMedia("(max-width: 760px)").matches ? "under “layers ▾”" : "on the left"}.` : null;
  }
  function defaultLayer() {
    const maps = S.layers.filter((l) => l.shape.length === 3 && l.name !== l.node);
    const pool = maps.length ? maps : S.layers.filter((l) => l.shape.length === 3);
    return pool.length ? pool[Math.floor(pool.length / 2)].name : (S.layers[0] || {}).name;
  }

  // ------------------------------------------------------------------ layers
  function renderLayers() {
    const filter = $("layer-filter").value.trim().toLowerCase();
    const list = $("layers");
    list.textContent = "";
    for (const l of S.layers) {
      const hay = (l.name + " " + l.node + " " + l.kind).toLowerCase();
      if (filter && !hay.includes(filter)) continue;
      const rf = l.receptive_field ? l.receptive_field.size[0] + " px" : "all";
      const li = el("li", { "data-layer": l.name, title: `${l.node} (${l.kind}); receptive field ${rf}` }, [
        el("span", { class: "nm" }, [el("span", { text: l.name + " " }), el("span", { class: "kind", text: l.name === l.node ? l.kind : l.node })]),
        el("span", { text: l.shape.join("×") }), el("span", { text: rf })]);
      if (l.name === S.layer) li.classList.add("on");
      li.addEventListener("click", () => { $("layers-panel").classList.remove("open"); go({ layer: l.name, channel: null, y: null, x: null }); });
      list.appendChild(li);
    }
    const on = list.querySelector("li.on");
    if (on && $("layers-panel").offsetHeight > 0) on.scrollIntoView({ block: "nearest" });
    $("layers-toggle").textContent = `${S.layer} ▾`;
  }

  // ------------------------------------------------------------------ images
  function renderImages() {
    const box = $("images");
    box.textContent = "";
    for (const im of S.info.images) {
      const d = el("div", { class: "img" + (im.id === S.image ? " on" : ""), "data-image": im.id, title: `${im.name} (${im.width}×${im.height})` },
        [el("img", { src: api(`/api/images/${im.id}.png`), alt: im.name }), el("span", { text: im.name })]);
      d.addEventListener("click", () => go({ image: im.id }));
      box.appendChild(d);
    }
    const add = el("div", { class: "add", id: "upload", text: "upload or drop an image (JPEG, PNG, WebP)" });
    add.addEventListener("click", () => $("upload-input").click());
    box.appendChild(add);
  }
  async function upload(file) {
    try {
      const r = await call("/api/images", { name: file.name }, { method: "POST", body: file,
        headers: { "X-Zfvis-Token": TOKEN, "Content-Type": file.type || "application/octet-stream" } });
      const entry = await r.json();
      S.info.images.push(entry);
      go({ image: entry.id });
    } catch (err) { showError("upload refused: " + err.message); }
  }

  // ------------------------------------------------------------------ feature maps
  async function loadMaps() {
    const seq = S.seq;
    const g = await getJSON("/api/maps", { image: S.image, layer: S.layer, rule: S.rule === "all" ? "deconvnet" : S.rule });
    if (seq !== S.seq) return;
    g.spriteURL = api("/api/maps.png", { image: S.image, layer: S.layer });
    S.grid = g;
    renderMaps();
  }
  function order() {
    const idx = S.grid.max.map((_, i) => i);
    if (S.sort === "strongest") idx.sort((a, b) => S.grid.max[b] - S.grid.max[a] || a - b);
    return idx;
  }
  const isOutput = (l) => !!(l && S.info.classes && l.shape.length === 1 && l.shape[0] === S.info.classes.length &&
    S.layers.length && S.layers[S.layers.length - 1].name === l.name);
  function softmax(v) {
    const m = Math.max(...v), e = v.map((x) => Math.exp(x - m)), z = e.reduce((a, b) => a + b, 0);
    return e.map((x) => x / z);
  }
  function renderMaps() {
    const g = S.grid, box = $("maps"), l = layerInfo(S.layer);
    box.textContent = "";
    box.className = "maps";
    if (g.vector) { renderUnits(g, l); return; }
    const [th, tw] = g.sprite.tile;
    const side = g.channels > 1024 ? 26 : g.channels > 256 ? 36 : g.channels > 64 ? 52 : 64;
    const dense = g.channels > 256;
    const scale = side / Math.max(th, tw), w = Math.round(tw * scale), h = Math.round(th * scale);
    box.style.setProperty("--tile", (w + (dense ? 2 : 10)) + "px");
    if (dense) box.classList.add("dense");
    $("maps-title").textContent = `${S.layer}: ${g.channels} feature maps of ${g.map_size[0]}×${g.map_size[1]}`;
    $("maps-note").textContent = "each map scaled to its own maximum (black: zero)" + (dense ? "; hover a map for its number and maximum" : "; the number is its maximum");
    const rows = Math.ceil(g.channels / g.sprite.cols);
    const frag = document.createDocumentFragment();
    for (const c of order()) {
      const col = c % g.sprite.cols, row = Math.floor(c / g.sprite.cols);
      const t = el("div", { class: "t", style: `width:${w}px;height:${h}px;background-image:url("${g.spriteURL}");` +
        `background-size:${g.sprite.cols * w}px ${rows * h}px;background-position:-${col * w}px -${row * h}px` });
      const kids = dense ? [t] : [t, el("div", { class: "c", text: "#" + c }), el("div", { class: "v", text: fmt(g.max[c]) })];
      const tile = el("div", { class: "tile" + (c === S.channel ? " on" : ""), "data-channel": c, title: `channel ${c}: maximum ${fmt(g.max[c])}` }, kids);
      tile.addEventListener("click", () => go({ channel: c, y: null, x: null }));
      frag.appendChild(tile);
    }
    box.appendChild(frag);
  }
  function renderUnits(g, l) {
    // a vector layer: one row per unit, a bar for its value; the output layer's units are classes
    const box = $("maps"), classes = isOutput(l) ? S.info.classes : null;
    const probs = classes ? softmax(g.max) : null;
    const rank = new Map([...g.max.keys()].sort((a, b) => g.max[b] - g.max[a] || a - b).map((c, i) => [c, i + 1]));
    const hi = Math.max(...g.max.map(Math.abs), 1e-12);
    box.classList.add("units");
    $("maps-title").textContent = classes ? `${S.layer}: the model's ${g.channels} class scores` : `${S.layer}: ${g.channels} units (a vector)`;
    $("maps-note").textContent = classes ? "rank, class, softmax probability; the bar is the score; click one to project it" : "each unit's value (the bar: against the largest); click one to project it";
    const frag = document.createDocumentFragment();
    for (const c of order()) {
      const label = classes ? `${classes[c]}` : `unit ${c}`;
      const bar = el("span", { class: "bar" }, [el("i", { style: `width:${Math.max(0, 100 * g.max[c] / hi).toFixed(1)}%` }), el("b", { text: label })]);
      const row = el("div", { class: "unitrow tile" + (c === S.channel ? " on" : ""), "data-channel": c,
        title: classes ? `${classes[c]} (class ${c}): rank ${rank.get(c)}, probability ${pct(probs[c])}, score ${fmt(g.max[c])}` : `unit ${c}: ${g.max[c]}` },
        [el("span", { class: "r", text: "#" + rank.get(c) }), bar, el("span", { class: "p", text: classes ? pct(probs[c]) : fmt(g.max[c]) })]);
      row.addEventListener("click", () => go({ channel: c, y: null, x: null }));
      frag.appendChild(row);
    }
    box.appendChild(frag);
  }
  async function loadPredict() {
    const box = $("predict"), seq = S.seq;
    const data = await getJSON("/api/predict", { image: S.image });
    if (seq !== S.seq) return;
    box.textContent = "";
    if (!data.top) { box.hidden = true; return; }
    box.hidden = false;
    box.appendChild(el("h3", { text: `The model's top ${data.top.length} for this image (${data.layer})` }));
    const list = el("ol");
    for (const t of data.top) {
      const name = t.name !== null && t.name !== undefined ? t.name : `class ${t.class}`;
      const item = el("li", { "data-class": t.class, title: `${name}: class ${t.class}, rank ${t.rank}, probability ${pct(t.probability)}, score ${fmt(t.score)}` }, [
        el("span", { class: "muted", text: String(t.rank) }),
        el("span", { class: "bar" }, [el("i", { style: `width:${(100 * t.probability).toFixed(1)}%` }), el("b", { text: name })]),
        el("span", { class: "p", text: pct(t.probability) })]);
      item.style.cursor = "pointer";
      item.addEventListener("click", () => go({ layer: data.layer, channel: t.class, y: null, x: null }));
      list.appendChild(item);
    }
    box.appendChild(list);
  }

  // ------------------------------------------------------------------ one unit
  async function fetchProjection(rule) {
    const q = { image: S.image, layer: S.layer, channel: S.channel, rule };
    if (S.y !== null && S.x !== null) { q.y = S.y; q.x = S.x; }
    const r = await call("/api/project.png", q);
    const meta = JSON.parse(r.headers.get("X-Zfvis-Meta"));
    const url = URL.createObjectURL(await r.blob());
    S.urls.push(url);
    return { meta, url, npy: api("/api/project.npy", q) };
  }
  async function loadUnit() {
    const seq = S.seq, l = layerInfo(S.layer);
    for (const u of S.urls.splice(0)) URL.revokeObjectURL(u);
    if (S.channel === null) {
      $("unit-title").textContent = l && l.shape.length === 1 ? "Click a unit to project it to pixel space" : "Click a feature map to project its strongest activation to pixel space";
      $("unit-caption").textContent = ""; $("projections").textContent = "";
      $("rf-box").hidden = true; $("map-figure").hidden = true; $("top9").hidden = true;
      $("synth-figure").hidden = true; $("links").hidden = true;
      return;
    }
    const rules = S.rule === "all" ? ["deconvnet", "guided", "gradient"] : [S.rule];
    const shots = [];
    for (const rule of rules) shots.push(await fetchProjection(rule));
    if (seq !== S.seq) return;
    const m = shots[0].meta, [H, W] = m.shape.slice(1);
    const where = m.position ? ` at (${m.position[0]}, ${m.position[1]})` : "";
    let title;
    if (l.shape.length === 1) {
      const classes = isOutput(l) ? S.info.classes : null;
      if (classes && S.grid && S.grid.vector) {
        const probs = softmax(S.grid.max), rank = S.grid.max.filter((v) => v > S.grid.max[S.channel]).length + 1;
        title = `${S.layer}, class ${S.channel} “${classes[S.channel]}” (rank ${rank} of ${classes.length}, probability ${pct(probs[S.channel])}): its score, projected to pixel space`;
      } else title = `${S.layer}, unit ${S.channel}: its value, projected to pixel space`;
    } else {
      const which = (S.y !== null) ? "the activation" : "its strongest activation";
      title = `${S.layer}, channel ${S.channel}: ${which}${where}, projected to pixel space`;
    }
    $("unit-title").textContent = title;
    const [t, lft, b, r] = m.box;
    $("unit-caption").textContent = `value ${fmt(m.value)} · receptive field rows ${t}–${b - 1}, columns ${lft}–${r - 1} of the ${H}×${W} input · ` +
      (S.rule === "all" ? "three rules side by side" : `rule ${S.rule}`) + " · projections: zero is grey, scaled by the largest absolute value" +
      (m.value === 0 ? " · this activation is zero, so its projection is blank: click a brighter point" : "");
    const F = $("input-frame").clientWidth, box = $("rf-box"), k = F / W, kh = F / H;
    Object.assign(box.style, { left: lft * k + "px", top: t * kh + "px", width: (r - lft) * k + "px", height: (b - t) * kh + "px" });
    box.hidden = false;
    const proj = $("projections");
    proj.textContent = "";
    for (const [i, s] of shots.entries()) {
      const img = el("img", { src: s.url, alt: `projection (${rules[i]})`, class: "projection", "data-rule": rules[i],
        "data-npy": s.npy, "data-value": s.meta.value, "data-channel": S.channel, "data-layer": S.layer,
        "data-position": s.meta.position ? s.meta.position.join(",") : "" });
      const link = el("a", { href: s.npy, text: ".npy", download: "projection.npy" });
      const cap = el("figcaption", {}, [document.createTextNode(`projection, ${rules[i]} `), link]);
      proj.appendChild(el("figure", {}, [el("div", { class: "frame" }, [img]), cap]));
    }
    showMap(l, m);
    loadTop9(seq);
    await Promise.all([loadSynthetic(seq), loadLinks(seq)]);
    $("occlusion-panel").dataset.ready = "1";
  }
  function showMap(l, m) {
    const fig = $("map-figure");
    if (l.shape.length !== 3) { fig.hidden = true; return; }
    fig.hidden = false;
    const img = $("map-image");
    const src = api("/api/map.png", { image: S.image, layer: S.layer, channel: S.channel });
    if (img.getAttribute("src") !== src) img.src = src;
    const [h, w] = [l.shape[1], l.shape[2]], mk = $("map-marker");
    if (!m.position) { mk.hidden = true; return; }
    const F = $("map-frame").clientWidth;
    Object.assign(mk.style, { left: m.position[1] * F / w + "px", top: m.position[0] * F / h + "px", width: F / w + "px", height: F / h + "px" });
    mk.hidden = false;
  }
  function mapClick(ev) {
    const l = layerInfo(S.layer), rect = $("map-frame").getBoundingClientRect();
    const y = Math.floor((ev.clientY - rect.top) / rect.height * l.shape[1]);
    const x = Math.floor((ev.clientX - rect.left) / rect.width * l.shape[2]);
    go({ y: Math.min(Math.max(y, 0), l.shape[1] - 1), x: Math.min(Math.max(x, 0), l.shape[2] - 1) });
  }

  // ------------------------------------------------------------------ top 9 from mining runs
  async function loadTop9(seq) {
    const box = $("top9");
    if (!S.info.runs.length) { box.hidden = true; return; }
    const data = await getJSON("/api/units", { layer: S.layer, channel: S.channel });
    if (seq !== S.seq) return;
    box.textContent = "";
    for (const run of data.runs) {
      const title = el("h3", { text: `Top ${run.mined ? run.entries.length : 9} of this unit in the data set of mining run '${S.info.runs[run.run].name}' (projection | image patch) ` });
      box.appendChild(title);
      if (!run.mined) { box.appendChild(el("p", { class: "muted", text: run.reason })); continue; }
      title.appendChild(el("a", { href: api(run.page), target: "_blank", text: "gallery page ↗" }));
      const strip = el("div", { class: "top9" });
      const side = matchMedia("(max-width: 760px)").matches ? 72 : 96;  // every tile at one readable size
      for (const e of run.entries) {
        const k = side / Math.max(...e.size), ph = e.size[0] * k, pw = e.size[1] * k;
        const cut = (at, what) => el("div", { title: what, style: `background-image:url("${api(run.sheet)}");` +
          `background-size:${run.sheet_size[1] * k}px ${run.sheet_size[0] * k}px;background-position:${(side - pw) / 2 - at[1] * k}px ${(side - ph) / 2 - at[0] * k}px;` +
          `clip-path:inset(${(side - ph) / 2}px ${(side - pw) / 2}px)` });
        const label = e.file + (e.folder ? ` · ${e.folder}` : "");
        strip.appendChild(el("div", { class: "pair", "data-rank": e.rank, title: `#${e.rank}: ${e.image}, value ${e.value} at ${e.position}` }, [
          el("div", { class: "tiles" }, [cut(e.projection_at, "projection"), cut(e.patch_at, "image patch")]),
          el("span", { text: `#${e.rank} ${fmt(e.value)}` }), el("span", { class: "file", text: label })]));
      }
      box.appendChild(strip);
    }
    box.hidden = false;
  }

  // ------------------------------------------------------------------ synthetic image (feature visualization)
  const synthQuery = (job) => ({ layer: job.layer, channel: job.channel, steps: job.steps, seed: job.seed, param: job.param });
  function showSynth(job) {
    const img = $("synth-image"), bar = $("synth-progress"), status = $("synth-status"), busy = job.state === "queued" || job.state === "running";
    $("synth-run").disabled = busy;
    $("synth-run").hidden = job.state === "done";
    bar.hidden = !busy;
    bar.max = job.total; bar.value = job.done;
    S.synthShown = job.state === "done" ? `${job.layer}/${job.channel}/${job.steps}` : null;
    if (job.state === "done") {
      const src = api("/api/synthetic.png", synthQuery(job));
      if (img.getAttribute("src") !== src) img.src = src;
      img.hidden = false; $("synth-empty").hidden = true;
      const r = job.result;
      status.textContent = `objective ${fmt(r.first)} → ${fmt(r.value)} in ${job.steps} steps` + (job.cached ? " (cached)" : ` (${r.seconds.toFixed(1)} s)`);
    } else {
      img.hidden = true; img.removeAttribute("src"); $("synth-empty").hidden = false;
      status.textContent = job.state === "queued" ? "waiting for the images asked for before" : job.state === "running" ? `step ${job.done} of ${job.total}` :
        job.state === "none" ? `${job.steps} steps of gradient ascent from noise (Olah et al. 2017)` : `${job.state}: ${job.error || ""}`;
    }
  }
  async function loadSynthetic(seq) {
    const l = layerInfo(S.layer);
    $("synth-figure").hidden = !l || !l.shape.length;
    if ($("synth-figure").hidden) return;
    const key = `${S.layer}/${S.channel}/${$("synth-steps").value}`;
    if (S.cam && S.synthShown === key) return;  // a camera frame: the unit's synthetic image does not change
    try {
      const job = await getJSON("/api/synthetic", { layer: S.layer, channel: S.channel, steps: $("synth-steps").value });
      if (seq !== S.seq) return;
      showSynth(job);
      if (job.state === "queued" || job.state === "running") followSynth(job);
    } catch (err) { if (seq === S.seq) $("synth-status").textContent = err.message; }
  }
  const isShown = (job) => job.layer === S.layer && job.channel === S.channel && String(job.steps) === $("synth-steps").value;
  async function followSynth(job) {
    if (S.following === job.id) return;  // one poll loop per job
    S.following = job.id;
    try {
      while (job.state === "queued" || job.state === "running") {
        await new Promise((ok) => setTimeout(ok, 250));
        if (!isShown(job)) return;  // the page moved on; the job goes on and its image is cached
        job = await getJSON(`/api/synthetic/${job.id}`);
        if (isShown(job)) showSynth(job);
      }
    } catch (err) { $("synth-status").textContent = err.message; } finally { if (S.following === job.id) S.following = null; }
  }
  async function runSynthetic() {
    if (S.channel === null) return;
    try {
      const body = { layer: S.layer, channel: S.channel, steps: +$("synth-steps").value };
      const job = await (await call("/api/synthetic", {}, { method: "POST", body: JSON.stringify(body),
        headers: { "X-Zfvis-Token": TOKEN, "Content-Type": "application/json" } })).json();
      if (!isShown(job)) return;
      showSynth(job);
      followSynth(job);
    } catch (err) { $("synth-status").textContent = err.message; }
  }

  // ------------------------------------------------------------------ connections to the layer below
  async function loadLinks(seq) {
    const q = { image: S.image, layer: S.layer, channel: S.channel };
    if (S.y !== null && S.x !== null) { q.y = S.y; q.x = S.x; }
    const box = $("links-lists"), note = $("links-note");
    let d;
    try { d = await getJSON("/api/connections", q); } catch (err) { if (seq === S.seq) { box.textContent = ""; note.textContent = err.message; $("links").hidden = false; } return; }
    if (seq !== S.seq) return;
    $("links").hidden = false;
    box.textContent = "";
    if (!d.supported) {
      $("links-title").textContent = `Connections of ${S.layer} #${S.channel}`;
      note.textContent = d.reason;
      return;
    }
    $("links-title").textContent = `Inputs of ${S.layer} #${S.channel} from ${d.below} (top ${d.by_weight.length} of ${d.inputs})`;
    note.textContent = `at (${d.position[0]}, ${d.position[1]}) of its map: pre-activation ${fmt(d.preactivation)} = bias ${fmt(d.bias)} + the ${d.inputs} contributions (${fmt(d.contribution_sum)}). ` +
      `Thumbnails: each input's feature map on this image. Click one to walk down to it.`;
    const lists = [["by weight (‖filter slice‖)", d.by_weight, "weight"], ["by contribution on this image", d.by_contribution, "contribution"]];
    for (const [title, entries, kind] of lists) {
      const row = el("div", { class: "link-tiles", "data-kind": kind });
      for (const e of entries) {
        const tile = el("div", { class: "link", "data-channel": e.channel, "data-layer": d.below, role: "button", tabindex: "0",
          title: `${d.below} #${e.channel}: ${kind} ${fmt(e.value)}; ${kind === "weight" ? "contribution" : "weight"} ${fmt(e.other)}; map maximum ${fmt(e.max)}` }, [
          el("img", { src: api("/api/map.png", { image: S.image, layer: d.below, channel: e.channel }), alt: `${d.below} channel ${e.channel}` }),
          el("span", { text: "#" + e.channel }), el("span", { class: "v", text: fmt(e.value) })]);
        const walk = () => go({ layer: d.below, channel: e.channel, y: null, x: null });
        tile.addEventListener("click", walk);
        tile.addEventListener("keydown", (ev) => { if (ev.key === "Enter") walk(); });
        row.appendChild(tile);
      }
      box.appendChild(el("div", { class: "links-row" }, [el("h4", { text: title }), row]));
    }
  }

  // ------------------------------------------------------------------ live camera
  function setupCamera() {
    const ok = window.isSecureContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia;
    if (!ok) {
      $("camera-start").hidden = true;
      $("camera-status").textContent = "camera: open the explorer at http://127.0.0.1 or localhost to use it (browsers allow cameras only there or over HTTPS)";
      return;
    }
    $("camera-start").addEventListener("click", startCamera);
    $("camera-stop").addEventListener("click", stopCamera);
  }
  async function startCamera() {
    if (S.cam) return;
    let stream;
    try { stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 320 }, height: { ideal: 240 } }, audio: false }); }
    catch (err) { showError("camera: " + (err.message || err.name)); return; }
    const video = $("camera-video");
    video.srcObject = stream;
    video.hidden = false;
    try { await video.play(); } catch (e) { /* muted video plays; if not, frames wait for data */ }
    S.cam = { stream, busy: false, sent: 0, dropped: 0, since: performance.now(), timer: setInterval(grabFrame, 400) };
    $("camera-start").hidden = true; $("camera-stop").hidden = false;
    document.body.dataset.camera = "on";
  }
  function stopCamera() {
    const cam = S.cam;
    if (!cam) return;
    clearInterval(cam.timer);
    for (const t of cam.stream.getTracks()) t.stop();  // the camera's light goes off
    const video = $("camera-video");
    video.pause(); video.srcObject = null; video.hidden = true;
    S.cam = null;
    $("camera-start").hidden = false; $("camera-stop").hidden = true;
    $("camera-status").textContent = `camera stopped after ${cam.sent} frames`;
    document.body.dataset.camera = "off";
  }
  async function grabFrame() {
    const cam = S.cam, video = $("camera-video");
    if (!cam) return;
    if (cam.busy || video.readyState < 2 || !video.videoWidth) { cam.dropped += 1; return; }  // one frame in flight at most
    cam.busy = true;
    try {
      const k = Math.min(1, 320 / Math.max(video.videoWidth, video.videoHeight));
      const c = el("canvas", { width: Math.round(video.videoWidth * k), height: Math.round(video.videoHeight * k) });
      c.getContext("2d").drawImage(video, 0, 0, c.width, c.height);
      const blob = await new Promise((ok) => c.toBlob(ok, "image/jpeg", 0.85));
      const r = await call("/api/images", { live: 1, name: "camera" }, { method: "POST", body: blob,
        headers: { "X-Zfvis-Token": TOKEN, "Content-Type": "image/jpeg" } });
      const entry = await r.json();
      if (S.cam !== cam) return;  // stopped meanwhile
      cam.sent += 1;
      S.image = entry.id;
      await render({ maps: true, live: true, first: cam.sent === 1 });
      const fps = cam.sent / ((performance.now() - cam.since) / 1000);
      $("camera-status").textContent = `live: ${cam.sent} frames, ${fps.toFixed(1)} per second` + (cam.dropped ? `, ${cam.dropped} skipped while busy` : "");
    } catch (err) { showError("camera: " + err.message); } finally { cam.busy = false; }
  }

  // ------------------------------------------------------------------ occlusion
  function setupOcclusion() {
    const side = Math.min(S.info.input[1], S.info.input[2]);
    $("occ-patch").value = Math.max(1, Math.floor(side / 4));
    $("occ-stride").value = Math.max(1, Math.floor(side / 16));
    const sel = $("occ-target");
    sel.appendChild(el("option", { value: "", text: "the top class" }));
    (S.info.classes || []).forEach((c, i) => sel.appendChild(el("option", { value: i, text: `${i}: ${c}` })));
    $("occ-run").addEventListener("click", runOcclusion);
  }
  async function runOcclusion() {
    if (S.channel === null) { showError("choose a feature map first: occlusion maps its total activation"); return; }
    const body = { image: S.image, layer: S.layer, channel: S.channel, patch: +$("occ-patch").value, stride: +$("occ-stride").value };
    if ($("occ-target").value !== "") body.target = +$("occ-target").value;
    const status = $("occ-status"), bar = $("occ-progress");
    S.occImage = S.image;
    try {
      let job = await (await call("/api/occlusion", {}, { method: "POST", body: JSON.stringify(body),
        headers: { "X-Zfvis-Token": TOKEN, "Content-Type": "application/json" } })).json();
      bar.hidden = false;
      while (job.state === "running") {
        bar.max = job.total; bar.value = job.done;
        status.textContent = `${job.done} of ${job.total} occluder positions`;
        await new Promise((ok) => setTimeout(ok, 250));
        job = await getJSON(`/api/occlusion/${job.id}`);
      }
      bar.value = job.done;
      if (job.state !== "done") throw new Error(job.error || job.state);
      status.textContent = `${job.total} positions in ${job.seconds.toFixed(1)} s (${job.result.method})`;
      drawOcclusion(job);
    } catch (err) { status.textContent = ""; showError("occlusion: " + err.message); }
  }
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function heat(values, lo, hi) {
    const rows = values.length, cols = values[0].length, c = el("canvas", { width: cols, height: rows });
    const ctx = c.getContext("2d"), im = ctx.createImageData(cols, rows);
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
      const t = hi > lo ? Math.min(1, Math.max(0, (values[i][j] - lo) / (hi - lo))) : 0, p = 4 * (i * cols + j);
      const k = Math.min(3, Math.floor(t * 4)), f = t * 4 - k, a = VIRIDIS[k], b = VIRIDIS[k + 1];
      for (let ch = 0; ch < 3; ch++) im.data[p + ch] = a[ch] + (b[ch] - a[ch]) * f;
      im.data[p + 3] = 255;
    }
    ctx.putImageData(im, 0, 0);
    return c;
  }
  function overlay(values, lo, hi, caption, kind, job) {
    // the map over the image it was measured on, each cell centred where the occluder's centre was; a colour bar
    const r = job.result, [H, W] = S.info.input.slice(1), half = job.patch / 2, st = job.stride;
    const y0 = Math.max(0, r.tops[0] + half - st / 2), y1 = Math.min(H, r.tops[r.tops.length - 1] + half + st / 2);
    const x0 = Math.max(0, r.lefts[0] + half - st / 2), x1 = Math.min(W, r.lefts[r.lefts.length - 1] + half + st / 2);
    const map = heat(values, lo, hi);
    Object.assign(map.style, { left: 100 * x0 / W + "%", top: 100 * y0 / H + "%", width: 100 * (x1 - x0) / W + "%",
                               height: 100 * (y1 - y0) / H + "%" });
    const frame = el("div", { class: "frame" }, [el("img", { src: api(`/api/images/${S.occImage}.png`), alt: "the input image" }), map]);
    const bar = el("div", { class: "colorbar" }, [el("span", { text: fmt(lo) }), el("i"), el("span", { text: fmt(hi) })]);
    return el("figure", { "data-kind": kind }, [frame, bar, el("figcaption", { text: caption })]);
  }
  function drawOcclusion(job) {
    const r = job.result, box = $("occ-result"), flat = (m) => m.flat();
    box.textContent = "";
    const classes = S.info.classes;
    const name = r.target_name ? `“${r.target_name}”` : (classes && classes[r.target] ? `“${classes[r.target]}”` : `class ${r.target}`);
    const act = flat(r.activation), p = flat(r.class_prob);
    box.appendChild(overlay(r.activation, Math.min(...act), Math.max(...act),
      `total activation of ${job.layer} #${job.channel} with the occluder centred at each place (unoccluded ${fmt(r.base_activation)})`, "activation", job));
    box.appendChild(overlay(r.class_prob, 0, 1,
      `probability of ${name} with the occluder there (unoccluded ${pct(r.base_prob)}, lowest ${pct(Math.min(...p))})`, "probability", job));
  }

  // ------------------------------------------------------------------ navigation
  async function render(what) {
    S.seq += 1;
    showError(null);
    document.querySelectorAll(".rules button").forEach((b) => b.classList.toggle("on", b.dataset.rule === S.rule));
    $("sort").value = S.sort;
    $("input-image").src = api(`/api/images/${S.image}.png`);
    if (!what.live || what.first) { renderImages(); renderLayers(); }
    try {
      if (S.predictFor !== S.image) { S.predictFor = S.image; await loadPredict(); }
      if (what.maps) await loadMaps(); else if (S.grid) renderMaps();
      await loadUnit();
      document.body.dataset.ready = String(S.seq);
    } catch (err) { showError(err); document.body.dataset.ready = String(S.seq); }
  }
  function go(change, push = true) {
    const maps = "image" in change || "layer" in change;
    S.notice = null;
    Object.assign(S, change);
    writeURL(push && !("sort" in change));
    render({ maps });
  }
  function key(ev) {
    if (ev.target.closest("input, select, textarea") || !S.grid) return;
    const ids = order();
    if (ev.key === "ArrowLeft" || ev.key === "ArrowRight") {
      const at = S.channel === null ? -1 : ids.indexOf(S.channel);
      const next = ids[Math.min(Math.max(at + (ev.key === "ArrowRight" ? 1 : -1), 0), ids.length - 1)];
      go({ channel: next, y: null, x: null }); ev.preventDefault();
    } else if (ev.key === "ArrowUp" || ev.key === "ArrowDown") {
      const named = S.layers.filter((l) => l.name !== l.node);  // the model's named layers (conv1, ..., fc8)
      const walk = (named.length >= 2 ? named : S.layers).map((l) => l.name);
      const pos = (name) => S.layers.findIndex((l) => l.name === name), here = pos(S.layer);
      const next = ev.key === "ArrowDown" ? walk.find((n) => pos(n) > here) : walk.filter((n) => pos(n) < here).pop();
      if (next && next !== S.layer) {
        const l = layerInfo(next), count = l.shape.length ? l.shape[0] : 0;
        const channel = S.channel === null ? null : Math.min(S.channel, count - 1);  // the channel, or its nearest
        go({ layer: next, channel, y: null, x: null });
      }
      ev.preventDefault();
    }
  }
  function setupDrop() {
    let depth = 0;
    document.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; $("drop").hidden = false; });
    document.addEventListener("dragleave", () => { depth -= 1; if (depth <= 0) { depth = 0; $("drop").hidden = true; } });
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => {
      e.preventDefault(); depth = 0; $("drop").hidden = true;
      if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
    });
    $("upload-input").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); e.target.value = ""; });
  }

  async function start() {
    try {
      S.info = await getJSON("/api/info");
      S.layers = (await getJSON("/api/layers")).layers;
    } catch (err) { showError(err); return; }
    $("model-name").textContent = `${S.info.model}, input ${S.info.input.join("×")}`;
    document.title = `zfvis explorer: ${S.info.model}`;
    document.querySelectorAll(".rules button").forEach((b) => b.addEventListener("click", () => go({ rule: b.dataset.rule })));
    $("layer-filter").addEventListener("input", renderLayers);
    $("layers-toggle").addEventListener("click", () => {
      const open = $("layers-panel").classList.toggle("open");
      $("layers-toggle").setAttribute("aria-expanded", String(open));
      if (open) $("layer-filter").focus();
    });
    $("sort").addEventListener("change", () => go({ sort: $("sort").value }));
    $("map-frame").addEventListener("click", mapClick);
    document.addEventListener("keydown", key);
    window.addEventListener("popstate", () => { readURL(); render({ maps: true }); });
    setupDrop();
    setupOcclusion();
    setupCamera();
    $("synth-run").addEventListener("click", runSynthetic);
    $("synth-steps").addEventListener("change", () => loadSynthetic(S.seq));
    readURL();
    writeURL(false);
    render({ maps: true });
  }
  start();
})();
