// The contouring page: upload, progress, history, slice viewer, downloads. Everything comes from /ctv/api/.
"use strict";

const API = "/ctv/api";
const AUTO_RGB = [255, 128, 0];
const ANNOTATION_RGB = [0, 200, 255];
const $ = (id) => document.getElementById(id);

const state = { case: null, meta: null, image: null, mask: null, annotation: null, slice: 0, timer: null };
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
  select.replaceChildren(...done.map((r) => new Option(`${new Date(r.created * 1000).toLocaleString()} · model ${r.model.slice(0, 12)}`, r.id)));
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
  state.mask = resultId ? await bytes(`/cases/${c.id}/view/mask?result=${resultId}`) : null;
  const result = c.results.find((r) => r.id === resultId);
  const rows = [["input", c.input.name], ["input sha256", c.input.sha256]];
  if (c.input.contoured_sha256 !== c.input.sha256) rows.push(["series sha256", c.input.contoured_sha256]);
  if (result) rows.push(["model sha256", result.model], ["CTV volume", `${result.ctv_volume_ml.toFixed(1)} ml`]);
  $("provenance").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v; dd.className = k.includes("sha") ? "sha" : "";
    return [dt, dd];
  }));
  const labels = { nifti: "NIfTI", rtstruct: "RTSTRUCT", dicom_seg: "DICOM SEG" };
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

function applyLayout() {
  const side = $("layout").value === "side";
  $("figure-image").hidden = !side;
  $("figure-annotation").hidden = !side || !state.annotation;
  $("caption-main").textContent = side ? "image + auto contour" : "image + auto contour + saved annotation";
  if (state.meta) showSlice(state.slice);
}

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
  for (const [mask, rgb] of overlays) {
    if (!mask) continue;
    for (let i = 0; i < n; i++) {
      if (!mask[offset + i]) continue;
      const r = (i / cols) | 0, c = i - r * cols;
      const edge = c === 0 || c === cols - 1 || r === 0 || r === rows - 1 ||
        !mask[offset + i - 1] || !mask[offset + i + 1] || !mask[offset + i - cols] || !mask[offset + i + cols];
      const a = edge ? 1.0 : 0.35, p = 4 * i;
      px[p] = px[p] * (1 - a) + rgb[0] * a; px[p + 1] = px[p + 1] * (1 - a) + rgb[1] * a; px[p + 2] = px[p + 2] * (1 - a) + rgb[2] * a;
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
  if ($("layout").value === "side") {
    draw("view-main", state.slice, [[state.mask, AUTO_RGB]]);
    draw("view-image", state.slice, []);
    if (state.annotation) draw("view-annotation", state.slice, [[state.annotation, ANNOTATION_RGB]]);
  } else {
    draw("view-main", state.slice, [[state.mask, AUTO_RGB], [state.annotation, ANNOTATION_RGB]]);
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
  const r = await (await api(`/cases/${state.case.id}/contour`, { method: "POST" })).json();
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
refreshHistory().catch((e) => showError(e.message));
