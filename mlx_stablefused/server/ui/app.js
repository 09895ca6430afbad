// The mlx-stablefused web UI: a static page over the server's own APIs (AUTOMATIC1111's /sdapi/v1 and /ui/v1).
// No framework, no build step, nothing fetched from elsewhere: it works offline, served by the app itself.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tab: "txt2img", caps: null, busy: false, cancelled: false, initImage: null, lastSeed: null,
                poll: null, gallery: [], task: null };

// ------------------------------------------------------------------------------------------------ requests
async function api(path, body) {
  const options = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" },
                                              body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
  if (!response.ok) {
    const message = (data && (typeof data.error === "string" ? data.error : data.error && data.error.message))
      || `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return data;
}

const num = (id) => Number($(id).value);
const int = (id) => Math.round(Number($(id).value));
const dataUrl = (b64, mime = "image/png") => `data:${mime};base64,${b64}`;

function common() {
  return { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, seed: int("seed"),
           steps: int("steps"), cfg_scale: num("cfg_scale"), width: int("width"), height: int("height"),
           sampler_name: $("sampler_name").value, scheduler: $("scheduler").value };
}

function initImagePayload() {
  if (!state.initImage) throw new Error("choose an input image first (a file, a drop, or a gallery result)");
  return { init_images: [state.initImage], denoising_strength: num("denoising_strength") };
}

// What each tab sends, and how its answer becomes results: [{src, mime, params, seed, video}].
const MODES = {
  txt2img: {
    path: "/sdapi/v1/txt2img",
    body: () => ({ ...common(), batch_size: int("batch_size"), enable_hr: $("enable_hr").checked,
                   hr_scale: num("hr_scale"), hr_upscaler: $("hr_upscaler").value,
                   hr_second_pass_steps: int("hr_second_pass_steps"), denoising_strength: num("hr_denoising") }),
    results: a1111Results,
  },
  img2img: {
    path: "/sdapi/v1/img2img",
    body: () => ({ ...common(), batch_size: int("batch_size"), ...initImagePayload(),
                   resize_mode: int("resize_mode") }),
    results: a1111Results,
  },
  inpaint: {
    path: "/sdapi/v1/img2img",
    body: () => ({ ...common(), batch_size: int("batch_size"), ...initImagePayload(), mask: painter.maskDataUrl(),
                   mask_blur: int("mask_blur"), inpainting_fill: int("inpainting_fill"),
                   inpainting_mask_invert: $("invert").checked ? 1 : 0 }),
    results: a1111Results,
  },
  sweep: {
    path: "/ui/v1/sweep",
    body: () => {
      const scales = $("cfg_scales").value.split(/[,\s]+/).filter(Boolean).map(Number);
      if (!scales.length || scales.some(Number.isNaN)) throw new Error("cfg scales: give numbers separated by commas");
      return { ...common(), cfg_scales: scales };
    },
    results: (data) => data.grid ? [{ src: dataUrl(data.grid), mime: "image/png", seed: data.seed,
                                      params: data.infotexts[0].replace(/CFG scale: [^,]+, /, "") +
                                              `\nCFG scales: ${data.cfg_scales.join(", ")}`, label: "sweep grid" }] : [],
  },
  interpolate: { path: "/ui/v1/video", body: () => videoBody("interpolate"), results: videoResults },
  latent_walk: { path: "/ui/v1/video", body: () => videoBody("latent_walk"), results: videoResults },
  animatediff: { path: "/ui/v1/video", body: () => videoBody("animatediff"), results: videoResults },
};

function videoBody(kind) {
  const c = common();
  const prompts = kind === "interpolate" ? $("prompts").value.split("\n").map((p) => p.trim()).filter(Boolean)
                                         : [c.prompt];
  const frames = { interpolate: int("frames_pair"), latent_walk: int("frames_leg"), animatediff: int("frames_video") };
  const body = { kind, prompts, negative_prompt: c.negative_prompt, seed: c.seed, steps: c.steps,
                 cfg_scale: c.cfg_scale, width: c.width, height: c.height, frames: frames[kind],
                 points: int("points"), loop: $("loop").checked, same_noise: $("same_noise").checked,
                 fps: int("fps"), format: $("format").value };
  if (kind !== "animatediff") Object.assign(body, { sampler_name: c.sampler_name, scheduler: c.scheduler });
  return body;
}

function a1111Results(data) {
  const info = JSON.parse(data.info);
  return data.images.map((b64, k) => ({ src: dataUrl(b64), mime: "image/png", params: info.infotexts[k],
                                         seed: info.all_seeds[k] }));
}

function videoResults(data) {
  if (!data.video) return [];
  return [{ src: dataUrl(data.video, data.mime), mime: data.mime, params: data.parameters, seed: data.seed,
            video: data.format !== "gif", label: `${data.frames.length} frames`,
            firstFrame: data.frames.length ? dataUrl(data.frames[0]) : null }];
}

// ------------------------------------------------------------------------------------------------ running
async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  const mode = MODES[state.tab];
  showError(null);
  let body;
  try { body = mode.body(); } catch (e) { showError(e.message); return; }
  // The job's own name (A1111's force_task_id): its progress and its cancel are this job's alone.
  state.task = `ui-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  body.force_task_id = state.task;
  setBusy(true);
  const tab = state.tab;
  try {
    const data = await api(mode.path, body);
    const results = mode.results(data);
    const interrupted = state.cancelled || Boolean(data.interrupted);
    if (!results.length) throw new Error(interrupted ? "cancelled before any result" : "the server returned nothing");
    results.forEach((r) => Object.assign(r, { kind: tab, interrupted }));
    showResults(results);
    results.slice().reverse().forEach(addToGallery);
    state.lastSeed = results[0].seed;
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  state.busy = busy;
  state.cancelled = false;
  $("generate").disabled = busy || Boolean(unavailableReason());
  $("cancel").disabled = !busy;
  $("generate").textContent = busy ? "Generating..." : "Generate";
  $("result").classList.toggle("stale", busy);
  $("result-params").classList.toggle("stale", busy);  // the last result stays, dimmed, until the new one comes
  if (busy) {
    $("progress").value = 0;
    $("progress-text").textContent = "queued";
    state.poll = setInterval(pollProgress, 400);
  } else {
    clearInterval(state.poll);
    $("live-preview").hidden = true;
    $("progress-text").textContent = "idle";
    $("progress").value = 0;
  }
}

async function pollProgress() {
  let p;
  try { p = await api("/internal/progress", { id_task: state.task, live_preview: true }); } catch (e) { return; }
  if (!state.busy) return;
  $("progress").value = p.progress;
  const parts = [];
  if (p.queued) parts.push(p.queue_ahead ? `queued, ${p.queue_ahead} ahead` : "queued");
  if (p.active && p.sampling_steps) parts.push(`step ${p.sampling_step}/${p.sampling_steps}`);
  if (p.active && p.job_count > 1) parts.push(`image ${p.job_no + 1}/${p.job_count}`);
  if (p.active && p.eta > 0) parts.push(`${p.eta.toFixed(1)} s left`);
  if (state.cancelled) parts.push("cancelling...");
  $("progress-text").textContent = parts.join(" \u00b7 ") || "starting";
  if (p.live_preview) {
    $("live-preview").src = p.live_preview;
    $("live-preview").hidden = false;
  }
}

async function cancel() {
  if (!state.busy) return;
  state.cancelled = true;
  $("cancel").disabled = true;
  try { await api("/ui/v1/cancel", { id_task: state.task }); } catch (e) { showError(e.message); }
}

// ------------------------------------------------------------------------------------------------ showing
function mediaElement(r, small) {
  const el = document.createElement(r.video ? "video" : "img");
  el.src = r.src;
  if (r.video) Object.assign(el, { controls: true, loop: true, autoplay: true, muted: true });
  if (small) el.className = "small";
  el.alt = r.params ? r.params.split("\n")[0] : "";
  return el;
}

function extension(mime) {
  return { "image/png": "png", "image/gif": "gif", "video/mp4": "mp4", "video/webm": "webm" }[mime] || "bin";
}

function fileName(r) {
  return `mlx-stablefused-${r.kind}-${r.seed}.${extension(r.mime)}`;
}

function downloadLink(r, text) {
  const a = document.createElement("a");
  a.href = r.src;
  a.download = fileName(r);
  a.textContent = text || `Download ${extension(r.mime).toUpperCase()}`;
  return a;
}

function showResults(results) {
  const box = $("result");
  box.replaceChildren(...results.map((r) => mediaElement(r, results.length > 1)));
  $("result-params").textContent = results.map((r) => (r.interrupted ? "[interrupted] " : "") + r.params).join("\n\n");
  $("result-params").hidden = false;
  $("result-links").replaceChildren(...results.map((r, k) => downloadLink(r, results.length > 1 ? `Download ${k + 1}` : null)));
}

function addToGallery(r) {
  state.gallery.unshift(r);
  const card = document.createElement("div");
  card.className = "card" + (r.interrupted ? " interrupted" : "");
  const thumb = document.createElement("img");
  thumb.src = r.video ? (r.firstFrame || "") : r.src;
  thumb.title = "show";
  thumb.addEventListener("click", () => showResults([r]));
  const kind = document.createElement("div");
  kind.className = "kind";
  kind.textContent = `${TAB_NAMES[r.kind]}${r.label ? " \u00b7 " + r.label : ""} \u00b7 seed ${r.seed}` +
                     (r.interrupted ? " \u00b7 interrupted" : "");
  const params = document.createElement("div");
  params.className = "params";
  params.textContent = r.params;
  params.title = r.params;
  const buttons = document.createElement("div");
  buttons.className = "row";
  buttons.append(downloadLink(r, "Download"));
  if (r.mime === "image/png") {
    buttons.append(button("To img2img", () => useAsInput(r.src, "img2img")),
                   button("To inpaint", () => useAsInput(r.src, "inpaint")));
  }
  buttons.append(button("Reuse seed", () => { $("seed").value = r.seed; }));
  card.append(thumb, kind, params, buttons);
  $("gallery").prepend(card);
}

function button(text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

// ------------------------------------------------------------------------------------------------ inputs
function useAsInput(src, tab) {
  const image = new Image();
  image.onload = () => {
    state.initImage = src;
    $("width").value = Math.max(8, Math.floor(image.naturalWidth / 8) * 8);
    $("height").value = Math.max(8, Math.floor(image.naturalHeight / 8) * 8);
    $("init-preview").src = src;
    painter.load(image);
    selectTab(tab || state.tab);  // shows the image (img2img) or the painter (inpaint) on its own tab
  };
  image.onerror = () => showError("that file is not an image the browser can read");
  image.src = src;
}

function readFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => useAsInput(reader.result, null);
  reader.readAsDataURL(file);
}

// The mask painter: strokes drawn twice, red on the visible overlay and white-on-black on a hidden canvas
// at the image's own size, which is what is sent as A1111's mask (white = repaint).
const painter = {
  overlay: null, mask: null, drawing: false, last: null, painted: false,
  init() {
    this.overlay = $("mask-canvas");
    this.mask = document.createElement("canvas");
    const start = (e) => { this.drawing = true; this.last = this.point(e); this.stroke(this.last);
                           this.overlay.setPointerCapture(e.pointerId); e.preventDefault(); };
    const move = (e) => { if (!this.drawing) return; const p = this.point(e); this.stroke(p); this.last = p; };
    const end = () => { this.drawing = false; this.last = null; };
    this.overlay.addEventListener("pointerdown", start);
    this.overlay.addEventListener("pointermove", move);
    this.overlay.addEventListener("pointerup", end);
    this.overlay.addEventListener("pointerleave", end);
    $("clear-mask").addEventListener("click", () => this.clear());
  },
  load(image) {
    const canvas = $("image-canvas");
    for (const c of [canvas, this.overlay, this.mask]) { c.width = image.naturalWidth; c.height = image.naturalHeight; }
    canvas.getContext("2d").drawImage(image, 0, 0);
    canvas.style.width = `${Math.min(512, Math.max(256, image.naturalWidth))}px`;
    this.clear();
  },
  clear() {
    this.overlay.getContext("2d").clearRect(0, 0, this.overlay.width, this.overlay.height);
    const m = this.mask.getContext("2d");
    m.fillStyle = "black";
    m.fillRect(0, 0, this.mask.width, this.mask.height);
    this.painted = false;
  },
  point(e) {
    const rect = this.overlay.getBoundingClientRect();
    return { x: (e.clientX - rect.left) * this.overlay.width / rect.width,
             y: (e.clientY - rect.top) * this.overlay.height / rect.height };
  },
  brush() {  // the slider is in screen pixels; the canvases are in image pixels
    const rect = this.overlay.getBoundingClientRect();
    return num("brush") * this.overlay.width / Math.max(rect.width, 1);
  },
  stroke(p) {
    const from = this.last || p;
    const erase = $("erase").checked;
    const line = (ctx, color, composite) => {
      ctx.globalCompositeOperation = composite;
      Object.assign(ctx, { strokeStyle: color, lineWidth: this.brush(), lineCap: "round", lineJoin: "round" });
      ctx.beginPath();
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(p.x + 0.01, p.y);
      ctx.stroke();
    };
    line(this.overlay.getContext("2d"), "#ff3030", erase ? "destination-out" : "source-over");
    line(this.mask.getContext("2d"), erase ? "black" : "white", "source-over");
    if (!erase) this.painted = true;
  },
  maskDataUrl() {
    if (!this.painted) throw new Error("paint the part to repaint on the image first");
    return this.mask.toDataURL("image/png");
  },
};

// ------------------------------------------------------------------------------------------------ tabs, model
const TAB_NAMES = { txt2img: "Text to image", img2img: "Image to image", inpaint: "Inpaint", sweep: "CFG sweep",
                    interpolate: "Interpolation", latent_walk: "Latent walk", animatediff: "AnimateDiff" };

function unavailableReason() {
  return state.caps ? state.caps.modes[state.tab] : null;
}

function selectTab(tab) {
  state.tab = tab;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  document.querySelectorAll("[data-only]").forEach((el) => { el.hidden = !el.dataset.only.split(" ").includes(tab); });
  document.querySelectorAll("[data-not]").forEach((el) => { el.hidden = el.dataset.not.split(" ").includes(tab); });
  if (tab === "inpaint") $("painter").hidden = !state.initImage;
  if (tab === "img2img") $("init-preview").hidden = !state.initImage;
  const reason = unavailableReason();
  $("unavailable").hidden = !reason;
  $("unavailable").textContent = reason ? `Not available with the loaded model: ${reason}` : "";
  $("generate").disabled = state.busy || Boolean(reason);
}

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, text]) => {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    o.selected = value === selected;
    return o;
  }));
}

async function loadCapabilities() {
  const caps = await api("/ui/v1/capabilities");
  state.caps = caps;
  $("model-label").textContent = caps.is_demo ? caps.label : `${caps.backend} \u00b7 ${caps.dtype}`;
  $("model-label").classList.toggle("demo", caps.is_demo);
  document.querySelectorAll("#tabs button").forEach((b) => {
    const reason = caps.modes[b.dataset.tab];
    b.classList.toggle("unavailable", Boolean(reason));
    b.title = reason || "";
  });
  fillSelect($("format"), caps.video_formats.map((f) => [f, f.toUpperCase()]), caps.video_formats[0]);
  selectTab(state.tab);
  return caps;
}

async function loadModels() {
  const [models, options] = await Promise.all([api("/sdapi/v1/sd-models"), api("/sdapi/v1/options")]);
  fillSelect($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
}

async function switchModel() {
  const name = $("model").value;
  $("server-state").textContent = `loading ${name}...`;
  try {
    await api("/sdapi/v1/options", { sd_model_checkpoint: name });
    const caps = await loadCapabilities();
    setDefaults(caps);
    $("server-state").textContent = "";
  } catch (e) {
    showError(e.message);
    $("server-state").textContent = "";
    loadModels();
  }
}

function setDefaults(caps) {
  $("width").value = caps.default_size;
  $("height").value = caps.default_size;
  $("steps").value = Math.min(caps.default_steps, 20);
}

async function start() {
  painter.init();
  $("tabs").addEventListener("click", (e) => { if (e.target.dataset.tab) selectTab(e.target.dataset.tab); });
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", switchModel);
  $("random-seed").addEventListener("click", () => { $("seed").value = -1; });
  $("reuse-seed").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("init_file").addEventListener("change", (e) => readFile(e.target.files[0]));
  $("clear-gallery").addEventListener("click", () => { state.gallery = []; $("gallery").replaceChildren(); });
  const drop = $("image-input");
  drop.addEventListener("dragover", (e) => e.preventDefault());
  drop.addEventListener("drop", (e) => { e.preventDefault(); readFile(e.dataTransfer.files[0]); });
  try {
    const [samplers, schedulers, loras] = await Promise.all([
      api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/loras")]);
    fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]), "Euler a");
    fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
    if (loras.length) {
      $("loras").hidden = false;
      $("loras").append(...loras.map((l) => button(l.name, () => { $("prompt").value += ` <lora:${l.name}:1>`; })));
    }
    await loadModels();
    setDefaults(await loadCapabilities());
    document.body.dataset.ready = "1";  // for the browser tests: the page has what it needs
  } catch (e) {
    showError(`could not reach the server: ${e.message}`);
  }
}

start();
