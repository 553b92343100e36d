// Models and quality: a model's versions with their commissioning reports, the model card of the served
// version, and monitoring from clinicians' edits (GET /models/<m>, /models/<m>/card, /monitoring/<m>).
"use strict";

const $ = (id) => document.getElementById(id);
const short = (sha) => (sha ? sha.slice(0, 12) : "none");

async function get(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${r.status} ${path}`);
  return r.json();
}

function cell(row, content) {
  const td = row.insertCell();
  if (content instanceof Node) td.append(content);
  else td.textContent = content ?? "";
  return td;
}

function link(text, href, cls) {
  const a = document.createElement("a");
  a.textContent = text;
  a.href = href;
  if (cls) a.className = cls;
  return a;
}

function showVersions(listing) {
  $("mode").textContent = `${listing.mode} mode`;
  $("served").textContent = listing.served || "none approved";
  const body = $("versions").tBodies[0];
  body.replaceChildren();
  for (const v of [...listing.versions].reverse()) {
    const row = body.insertRow();
    row.className = v.status.replace(/ /g, "-");
    cell(row, short(v.sha256)).className = "sha";
    cell(row, v.status);
    cell(row, v.source);
    cell(row, v.created);
    cell(row, short(v.parent)).className = "sha";
    const reports = document.createElement("span");
    for (const r of v.commissioning) {
      reports.append(link(`${r.passed ? "passed" : "FAILED"} ${r.time}`, `/commission/reports/${r.id}.html`,
        r.passed ? "pass" : "fail"), " ");
    }
    cell(row, reports);
  }
}

function showCard(card) {
  $("card-version").textContent = short(card.version);
  const dl = $("card");
  dl.replaceChildren();
  const training = card.training;
  const approvals = card.approval_history.filter((e) => e.action !== "publish" && e.action !== "import");
  const facts = [
    ["intended use", card.intended_use],
    ["limitations", card.limitations],
    ["data", card.data],
    ["structures", card.structures.join(", ")],
    ["network", Object.entries(card.network).map(([k, v]) => `${k} ${JSON.stringify(v)}`).join("; ")],
    ["training", `${training.labels} labels (${Object.entries(training.annotators).map(([a, n]) => `${a}: ${n}`).join(", ") || "none"}), `
      + `${training.validation_labels} validation; validation Dice ${training.val_dice ?? "n/a"}`],
    ["commissioning", card.commissioning.map((r) => `${r.passed ? "passed" : "FAILED"} on ${r.cases} cases (${r.time})`).join("; ") || "none"],
    ["approval history", approvals.map((e) => `${e.action} by ${e.user} ${e.time}: ${e.comment}`).join("; ") || "never approved"],
  ];
  for (const [term, value] of facts) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dl.append(dt, dd);
  }
}

const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990"];

function svg(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// Surface Dice @3 mm per edit (dots) and its rolling median (line), per structure, edits in time order.
function drawChart(summary) {
  const chart = $("chart");
  chart.replaceChildren();
  const W = +chart.getAttribute("width"), H = +chart.getAttribute("height"), L = 40, B = 24, T = 8, R = 150;
  const n = summary.edits.length;
  const x = (i) => L + (n <= 1 ? 0 : (i * (W - L - R)) / (n - 1));
  const y = (v) => T + (1 - v) * (H - T - B);
  chart.append(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#1a1a1a", stroke: "#555" }));
  for (const v of [0, 0.5, 0.8, 1]) {
    chart.append(svg("text", { x: 4, y: y(v) + 4, fill: "#aaa", "font-size": 11 }, v.toFixed(1)));
  }
  chart.append(svg("text", { x: L, y: H - 6, fill: "#aaa", "font-size": 11 }, `edits in time order (${n})`));
  const names = Object.keys(summary.structures);
  names.forEach((name, k) => {
    const colour = COLOURS[k % COLOURS.length];
    const points = [];
    summary.edits.forEach((e, i) => {
      const f = e.structures[name];
      if (f && f.surface_dice_3mm !== null) points.push([i, f.surface_dice_3mm]);
    });
    const median = points.map((p, j) => {
      const recent = points.slice(Math.max(0, j - summary.window + 1), j + 1).map((q) => q[1]).sort((a, b) => a - b);
      const m = recent.length % 2 ? recent[(recent.length - 1) / 2] : (recent[recent.length / 2 - 1] + recent[recent.length / 2]) / 2;
      return [p[0], m];
    });
    for (const [i, v] of points) chart.append(svg("circle", { cx: x(i), cy: y(v), r: 2.5, fill: colour, opacity: 0.6 }));
    if (median.length) {
      chart.append(svg("polyline", { points: median.map(([i, v]) => `${x(i)},${y(v)}`).join(" "), fill: "none",
        stroke: colour, "stroke-width": 2, class: "median", "data-structure": name }));
    }
    const rule = summary.structures[name].criterion;
    const limit = rule ? parseFloat(rule.replace(/[<>=\s]/g, "")) : null;
    if (limit !== null && !Number.isNaN(limit)) {
      chart.append(svg("line", { x1: L, x2: W - R, y1: y(limit), y2: y(limit), stroke: colour, "stroke-dasharray": "4 4", opacity: 0.5 }));
    }
    chart.append(svg("text", { x: W - R + 8, y: T + 14 + 14 * k, fill: colour, "font-size": 12 }, name + (summary.structures[name].alarm ? " (ALARM)" : "")));
  });
}

function showQuality(summary) {
  $("window").textContent = summary.window;
  drawChart(summary);
  const body = $("structures").tBodies[0];
  body.replaceChildren();
  const alarms = [];
  for (const [name, s] of Object.entries(summary.structures)) {
    const row = body.insertRow();
    row.className = s.alarm ? "fail" : "pass";
    cell(row, name);
    cell(row, s.rolling_median_surface_dice_3mm.toFixed(3));
    cell(row, s.edits);
    cell(row, s.criterion ? `surface Dice @3 mm ${s.criterion}` : "none");
    cell(row, s.alarm ? "ALARM" : "ok");
    if (s.alarm) alarms.push(`${name}: rolling median ${s.rolling_median_surface_dice_3mm.toFixed(3)} (criterion ${s.criterion})`);
  }
  $("alarm").hidden = alarms.length === 0;
  $("alarm").textContent = alarms.length ? `Alarm: clinicians are editing more than accepted. ${alarms.join("; ")}` : "";
  const most = $("most-edited").tBodies[0];
  most.replaceChildren();
  for (const e of summary.most_edited) {
    const row = most.insertRow();
    cell(row, e.image);
    cell(row, e.apl_mm.toFixed(0));
    cell(row, short(e.version)).className = "sha";
    cell(row, e.annotator || "");
    cell(row, e.time);
  }
}

async function load(model) {
  const [listing, summary] = await Promise.all([get(`/models/${model}`), get(`/monitoring/${model}`)]);
  showVersions(listing);
  showQuality(summary);
  try {
    showCard(await get(`/models/${model}/card`));
  } catch (e) {
    $("card").textContent = "no version yet";
  }
  document.body.dataset.loaded = model; // for tests: everything shown
}

async function main() {
  const info = await get("/info/");
  const select = $("model");
  for (const name of Object.keys(info.lifecycle || {})) select.add(new Option(name, name));
  select.addEventListener("change", () => load(select.value));
  const wanted = new URLSearchParams(location.search).get("model");
  if (wanted) select.value = wanted;
  await load(select.value);
}

main().catch((e) => { document.body.dataset.error = String(e); $("alarm").hidden = false; $("alarm").textContent = String(e); });
