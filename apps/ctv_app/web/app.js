// The contouring page: upload, progress, history, slice viewer, legend, downloads. Everything comes from
// /ctv/api/: structure names, colours and volumes are the result's own (the model's description).
"use strict";

const API = "/ctv/api";
const ANNOTATION_RGB = [0, 200, 255];
const $ = (id) => document.getElementById(id);

// mask: the result's structures as a bitmask (bit value - 1 of a voxel set where it is in that structure);
// hidden: names of the structures toggled off (kept across results and cases).
const state = { case: null, meta: null, image: null, mask: null, structures: [], hidden: new Set(), annotation: null,
  slice: 0, timer: null };
window.ctvState = state; // for tests: what the page is showing
window.ctvTimings = []; // ms from a slice change to its pixels on the canvases (read by tests and bench)

async function api(path, options = {}) {
  const r = await fetch(API + path, { credentials: "same-origin", ...options });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return r;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setProgress(text, percent) {
  $("progress-row").hidden = false;
  $("status").textContent = text;
  if (percent === null) $("progress").removeAttribute("value"); // indeterminate while contouring
  else $("progress").value = percent;
}

// --- upload --------------------------------------------------------------------------------------
function upload() {
  const file = $("file").files[0];
  if (!file) { showError("Choose a NIfTI file or a zip of a DICOM series first."); return; }
  showError("");
  $("upload").disabled = true;
  const form = new FormData();
  form.append("file", file, file.name);
  if ($("model").value) form.append("model", $("model").value);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", API + "/cases");
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) setProgress(`Uploading ${file.name}`, 100 * e.loaded / e.total); };
  xhr.upload.onload = () => setProgress("Checking the upload", null);
  xhr.onload = async () => {
    $("upload").disabled = false;
    if (xhr.status !== 201) {
      let detail = xhr.statusText;
      try { detail = JSON.parse(xhr.responseText).detail; } catch (e) { /* not JSON */ }
      $("progress-row").hidden = true;
      showError(`Upload refused (${xhr.status}): ${detail}`);
      return;
    }
    const body = JSON.parse(xhr.responseText);
    await refreshHistory();
    await waitForResult(body.case.id, body.result.id);
  };
  xhr.onerror = () => { $("upload").disabled = false; showError("The upload failed: the server could not be reached."); };
  setProgress(`Uploading ${file.name}`, 0);
  xhr.send(form);
}

async function waitForResult(caseId, resultId) {
  for (;;) {
    const c = await (await api(`/cases/${caseId}`)).json();
    const result = c.results.find((r) => r.id === resultId);
    if (result.status === "done") { setProgress("Contoured", 100); await refreshHistory(); await openCase(caseId, resultId); return; }
    if (result.status === "failed") { $("progress-row").hidden = true; showError(`Contouring failed: ${result.error}`); await refreshHistory(); return; }
    setProgress(result.stage === "queued" ? "Waiting for the model" : `Contouring (${result.stage})`, null);
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
}

// --- history -------------------------------------------------------------------------------------
async function refreshHistory() {
  const cases = await (await api("/cases")).json();
  const list = $("history");
  list.replaceChildren();
  for (const c of cases) {
    const li = document.createElement("li");
    li.dataset.case = c.id;
    const done = c.results.filter((r) => r.status === "done").length;
    li.innerHTML = `<b></b> <span></span><br><span class="sha"></span>`;
    li.children[0].textContent = c.input.name;
    li.children[1].textContent = `${c.created} · ${done}/${c.results.length} results`;
    li.children[3].textContent = `sha256 ${c.input.sha256}`;
    if (state.case && state.case.id === c.id) li.classList.add("active");
    li.onclick = () => openCase(c.id);
    list.appendChild(li);
  }
}

// --- viewer --------------------------------------------------------------------------------------
async function bytes(path) { return new Uint8Array(await (await api(path)).arrayBuffer()); }

// A bitmask volume: 1, 2 or 4 little-endian bytes a voxel (up to 8, 16 or 32 structures).
async function bitmask(path) {
  const buffer = await (await api(path)).arrayBuffer();
  const width = buffer.byteLength / (state.meta.slices * state.meta.rows * state.meta.cols);
  return width === 1 ? new Uint8Array(buffer) : width === 2 ? new Uint16Array(buffer) : new Uint32Array(buffer);
}

async function openCase(caseId, resultId) {
  stopPlay();
  const c = await (await api(`/cases/${caseId}`)).json();
  state.case = c;
  state.annotation = null;
  state.meta = await (await api(`/cases/${caseId}/view`)).json();
  state.image = await bytes(`/cases/${caseId}/view/image`);
  // Taken into the state only once the canvases are sized below: resizing a canvas clears it.
  const annotation = c.annotation ? await bytes(`/cases/${caseId}/view/annotation`) : null;
  const done = c.results.filter((r) => r.status === "done");
  const select = $("result");
  select.replaceChildren(...done.map((r) => new Option(`${new Date(r.created * 1000).toLocaleString()} · ${r.model_name || "model"} ${r.model.slice(0, 12)}`, r.id)));
  select.value = resultId || (done.length ? done[done.length - 1].id : "");
  await loadResult();
  const m = state.meta;
  $("case-title").textContent = c.input.name;
  $("window").textContent = `Window: ${m.window.name}, W ${m.window.width} / L ${m.window.level}`;
  $("slice").max = m.slices - 1;
  for (const id of ["view-main", "view-image", "view-annotation"]) {
    const canvas = $(id);
    canvas.width = m.cols; canvas.height = m.rows;
    const width = Math.min(512, m.cols * 2);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${width * (m.rows * m.spacing_mm.row) / (m.cols * m.spacing_mm.col)}px`;
  }
  state.annotation = annotation;
  $("viewer-panel").hidden = false;
  applyLayout();
  showSlice(Math.floor(m.slices / 2));
  refreshHistory();
}

async function loadResult() {
  const resultId = $("result").value;
  const c = state.case;
  state.mask = resultId ? await bitmask(`/cases/${c.id}/view/mask?result=${resultId}`) : null;
  const result = c.results.find((r) => r.id === resultId);
  state.structures = result ? result.structures : [];
  showLegend();
  const rows = [["input", c.input.name], ["input sha256", c.input.sha256]];
  if (c.input.contoured_sha256 !== c.input.sha256) rows.push(["series sha256", c.input.contoured_sha256]);
  if (result && result.model_name) rows.push(["model", result.model_name]);
  if (result) rows.push(["model sha256", result.model]);
  $("provenance").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v; dd.className = k.includes("sha") ? "sha" : "";
    return [dt, dd];
  }));
  const labels = { nifti: "NIfTI label map", nifti_bitmask: "NIfTI bitmask (overlaps kept)", rtstruct: "RTSTRUCT",
    dicom_seg: "DICOM SEG" };
  $("downloads").replaceChildren(...Object.keys(result ? result.files : {}).map((fmt) => {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `${API}/cases/${c.id}/results/${result.id}/${fmt}`;
    a.textContent = labels[fmt] || fmt;
    a.dataset.format = fmt;
    a.download = "";
    li.appendChild(a);
    return li;
  }));
  if (state.meta) showSlice(state.slice);
}

// One row per structure of the result: show/hide, colour, name, volume.
function showLegend() {
  $("structures").replaceChildren(...state.structures.map((s) => {
    const row = document.createElement("tr");
    row.dataset.structure = s.name;
    row.innerHTML = `<td><input type="checkbox"></td><td><span class="swatch"></span></td><td class="name"></td>
      <td class="volume"></td>`;
    const toggle = row.querySelector("input");
    toggle.checked = !state.hidden.has(s.name);
    toggle.setAttribute("aria-label", `show ${s.name}`);
    toggle.onchange = () => {
      if (toggle.checked) state.hidden.delete(s.name); else state.hidden.add(s.name);
      if (state.meta) showSlice(state.slice);
    };
    row.querySelector(".swatch").style.background = `rgb(${s.colour.join(", ")})`;
    row.querySelector(".name").textContent = s.name;
    row.querySelector(".name").title = s.roi_type;
    row.querySelector(".volume").textContent = s.volume_ml == null ? "" : `${s.volume_ml.toFixed(1)} ml`;
    return row;
  }));
}

// The structures shown, as [bit, colour] layers; the first-listed (the targets) drawn last, on top.
function shownLayers() {
  return state.structures.filter((s) => !state.hidden.has(s.name)).map((s) => [1 << (s.value - 1), s.colour]).reverse();
}

function applyLayout() {
  const side = $("layout").value === "side";
  $("figure-image").hidden = !side;
  $("figure-annotation").hidden = !side || !state.annotation;
  $("caption-main").textContent = side ? "image + auto contour" : "image + auto contour + saved annotation";
  if (state.meta) showSlice(state.slice);
}

// overlays: [volume, layers]; a layer [bit, rgb] tints the voxels with that bit set, its outline opaque.
function draw(canvasId, k, overlays) {
  const { rows, cols } = state.meta;
  const n = rows * cols, offset = k * n;
  const canvas = $(canvasId);
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(cols, rows);
  const px = out.data, img = state.image;
  for (let i = 0; i < n; i++) {
    const g = img[offset + i], p = 4 * i;
    px[p] = g; px[p + 1] = g; px[p + 2] = g; px[p + 3] = 255;
  }
  for (const [mask, layers] of overlays) {
    if (!mask || !layers.length) continue;
    const any = layers.reduce((bits, [bit]) => bits | bit, 0);
    for (let i = 0; i < n; i++) {
      const v = mask[offset + i] & any;
      if (!v) continue;
      const r = (i / cols) | 0, c = i - r * cols, border = c === 0 || c === cols - 1 || r === 0 || r === rows - 1;
      for (const [bit, rgb] of layers) {
        if (!(v & bit)) continue;
        const edge = border || !(mask[offset + i - 1] & bit) || !(mask[offset + i + 1] & bit) ||
          !(mask[offset + i - cols] & bit) || !(mask[offset + i + cols] & bit);
        const a = edge ? 1.0 : 0.35, p = 4 * i;
        px[p] = px[p] * (1 - a) + rgb[0] * a; px[p + 1] = px[p + 1] * (1 - a) + rgb[1] * a; px[p + 2] = px[p + 2] * (1 - a) + rgb[2] * a;
      }
    }
  }
  ctx.putImageData(out, 0, 0);
}

function showSlice(k) {
  const t0 = performance.now();
  const m = state.meta;
  state.slice = Math.max(0, Math.min(m.slices - 1, k));
  $("slice").value = state.slice;
  $("slice-label").textContent = `slice ${state.slice + 1} / ${m.slices}`;
  const auto = [state.mask, shownLayers()], annotation = [state.annotation, [[1, ANNOTATION_RGB]]];
  if ($("layout").value === "side") {
    draw("view-main", state.slice, [auto]);
    draw("view-image", state.slice, []);
    if (state.annotation) draw("view-annotation", state.slice, [annotation]);
  } else {
    draw("view-main", state.slice, [auto, annotation]);
  }
  window.ctvTimings.push(performance.now() - t0);
  document.body.dataset.slice = state.slice;
}

// --- autoplay and keys -----------------------------------------------------------------------------
function stopPlay() { if (state.timer) clearInterval(state.timer); state.timer = null; $("play").textContent = "Play"; }

function togglePlay() {
  if (state.timer) { stopPlay(); return; }
  const interval = Math.max(20, Number($("interval").value) || 250);
  state.timer = setInterval(() => showSlice((state.slice + 1) % state.meta.slices), interval);
  $("play").textContent = "Pause";
}

document.addEventListener("keydown", (e) => {
  if (!state.meta || e.target.tagName === "INPUT" && e.target.type !== "range") return;
  const steps = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10 };
  if (e.key in steps) showSlice(state.slice + steps[e.key]);
  else if (e.key === "Home") showSlice(0);
  else if (e.key === "End") showSlice(state.meta.slices - 1);
  else return;
  e.preventDefault();
});

async function recontour() {
  const model = $("model").value ? `?model=${encodeURIComponent($("model").value)}` : "";
  const r = await (await api(`/cases/${state.case.id}/contour${model}`, { method: "POST" })).json();
  await refreshHistory();
  await waitForResult(state.case.id, r.id);
}

async function saveAnnotation() {
  const file = $("annotation-file").files[0];
  if (!file) { showError("Choose the annotation's NIfTI file first."); return; }
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    await api(`/cases/${state.case.id}/annotation`, { method: "PUT", body: form });
    showError("");
    await openCase(state.case.id, $("result").value);
  } catch (e) { showError(`Annotation refused: ${e.message}`); }
}

$("upload").onclick = upload;
$("slice").oninput = (e) => showSlice(Number(e.target.value));
$("play").onclick = togglePlay;
$("interval").onchange = () => { if (state.timer) { stopPlay(); togglePlay(); } };
$("layout").onchange = applyLayout;
$("result").onchange = loadResult;
$("recontour").onclick = () => recontour().catch((e) => showError(e.message));
$("annotation-upload").onclick = saveAnnotation;
// The models served, the default first; each option's title lists the structures it contours (a result's
// legend is that result's own structures, from the model that made it).
async function loadModels() {
  const models = await (await api("/models")).json();
  $("model").replaceChildren(...models.map((m) => {
    const option = new Option(m.name, m.name, m.default, m.default);
    option.title = m.structures.map((s) => s.name).join(", ");
    return option;
  }));
  $("model").title = models.length ? $("model").selectedOptions[0].title : "";
  $("model").onchange = () => { $("model").title = $("model").selectedOptions[0].title; };
}

loadModels().catch((e) => showError(e.message));
refreshHistory().catch((e) => showError(e.message));
