// The LocCa demo page: send an image to the server's REST API and draw the answer over it.
// Boxes are [x0, y0, x1, y1] in pixels of the image as displayed (after EXIF orientation, which the browser
// applies too), so each box is placed in percent of the image's natural size and stays on it at any zoom.
"use strict";

// service/render.py's PALETTE: the same colours in the page and in the annotated PNGs.
const PALETTE = ["rgb(255,20,147)", "rgb(0,150,255)", "rgb(255,120,0)", "rgb(0,150,136)", "rgb(230,0,230)",
                 "rgb(150,75,0)", "rgb(128,128,0)", "rgb(70,90,120)"];

const $ = (id) => document.getElementById(id);
const form = $("form"), fileInput = $("file"), drop = $("drop"), img = $("image"), boxes = $("boxes");
let file = null, imageUrl = null, pngUrl = null;

function task() { return form.querySelector("input[name=task]:checked").value; }

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function clearAnswer() {
  delete document.body.dataset.answered;
  boxes.replaceChildren();
  $("caption").textContent = "";
  $("json").textContent = "";
}

// Show the image as large as the page allows (small images scaled up), keeping its aspect ratio.
function fit() {
  const w = img.naturalWidth, h = img.naturalHeight;
  if (!w || !h) return;
  const room = $("result").clientWidth, wide = room > 900 ? room - 320 : room;  // leave the JSON a column
  const s = Math.min(Math.min(720, wide) / w, 0.75 * window.innerHeight / h);
  img.style.width = `${Math.round(w * s)}px`;
  img.style.height = `${Math.round(h * s)}px`;
}

// The answer as JSON, each box on one line.
function pretty(answer) {
  return JSON.stringify(answer, null, 2).replace(/\[\s+([-+\d.,\se]+?)\s+\]/g,
    (_, inner) => `[${inner.trim().split(/,\s*/).join(", ")}]`);
}

function setFile(f) {
  if (!f) return;
  file = f;
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = URL.createObjectURL(f);
  img.src = imageUrl;
  $("stage").hidden = false;
  $("run").disabled = $("png").disabled = false;
  clearAnswer();
  status("");
}

// The request of the chosen task, as a multipart form (the contract: file part `image`, fields as fields).
function request(render) {
  const t = task(), body = new FormData();
  body.append("image", file, file.name);
  if (t === "caption" && $("grounded").checked) body.append("grounded", "true");
  if (t === "refer") body.append("expression", $("expression").value);
  if (t === "ground") {
    if ($("box").value.trim()) body.append("box", $("box").value.trim());
    body.append("max_regions", $("max_regions").value || "32");
  }
  return fetch(`/v1/${t}${render ? "?render=png" : ""}`, { method: "POST", body, headers: auth() });
}

// A server with API keys (LOCCA_API_KEYS) wants `Authorization: Bearer <key>` on every /v1 call; the key is
// kept in the page only, never stored.
function auth() {
  const key = $("api_key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function failure(r) {
  try {
    const e = (await r.json()).error;
    return `${r.status} ${e.code}: ${e.message}`;
  } catch {
    return `${r.status} ${r.statusText}`;
  }
}

// (box, label) pairs of an answer, as service/render.py's labelled_boxes.
function labelled(t, answer) {
  if (t === "refer") return [[answer.box, answer.expression]];
  if (t === "ground") {
    const rs = answer.regions;
    return rs.map((r, i) => [r.box, rs.length === 1 ? r.text : `${i + 1}. ${r.text}`]);
  }
  return boxedPhrases(answer).map((p) => [p.box, p.text]);  // a grounded caption's phrases
}

function boxedPhrases(answer) { return (answer.phrases || []).filter((p) => p.box); }

// The caption, each boxed phrase in its box's colour (as service/render.py's caption band).
function showCaption(answer) {
  const text = answer.caption, out = [];
  let at = 0;
  boxedPhrases(answer).forEach((p, i) => {
    const [a, b] = p.span, span = document.createElement("span");
    out.push(text.slice(at, a));
    span.className = "phrase";
    span.textContent = text.slice(a, b);
    span.style.color = PALETTE[i % PALETTE.length];
    out.push(span);
    at = b;
  });
  out.push(text.slice(at));
  $("caption").replaceChildren(...out);
}

function draw(t, answer) {
  const w = img.naturalWidth, h = img.naturalHeight;
  boxes.replaceChildren(...labelled(t, answer).map(([b, label], i) => {
    const el = document.createElement("div"), tag = document.createElement("span");
    el.className = "box";
    el.dataset.box = JSON.stringify(b);
    Object.assign(el.style, {
      left: `${100 * b[0] / w}%`, top: `${100 * b[1] / h}%`,
      width: `${100 * (b[2] - b[0]) / w}%`, height: `${100 * (b[3] - b[1]) / h}%`,
      borderColor: PALETTE[i % PALETTE.length],
    });
    if (b[1] / h * img.clientHeight < 20) el.classList.add("low");  // no room above: the label goes under
    tag.className = "tag";
    tag.textContent = label;
    tag.style.background = PALETTE[i % PALETTE.length];
    el.append(tag);
    return el;
  }));
  if (t === "caption") showCaption(answer); else $("caption").textContent = "";
}

async function run(event) {
  event.preventDefault();
  if (!file) return;
  const t = task();
  clearAnswer();
  status(`${t}…`);
  $("run").disabled = true;
  const t0 = performance.now();
  try {
    const r = await request(false);
    if (!r.ok) { status(await failure(r), true); return; }
    const answer = await r.json();
    if (!img.complete) await new Promise((ok) => img.addEventListener("load", ok, { once: true }));
    draw(t, answer);
    $("json").textContent = pretty(answer);
    status(`${t}: ${Math.round(performance.now() - t0)} ms`);
    document.body.dataset.answered = t;  // for the browser test: this answer is on the page
  } catch (e) {
    status(`request failed: ${e}`, true);
  } finally {
    $("run").disabled = false;
  }
}

async function annotatedPng() {
  if (!file) return;
  status("rendering…");
  try {
    const r = await request(true);
    if (!r.ok) { status(await failure(r), true); return; }
    if (pngUrl) URL.revokeObjectURL(pngUrl);
    pngUrl = URL.createObjectURL(await r.blob());
    const a = document.createElement("a");
    a.href = pngUrl;
    a.download = `${(file.name || "image").replace(/\.[^.]*$/, "")}-${task()}.png`;
    a.click();
    status("annotated PNG downloaded");
  } catch (e) {
    status(`request failed: ${e}`, true);
  }
}

function syncTask() {
  form.dataset.task = task();
}

img.addEventListener("load", fit);
window.addEventListener("resize", fit);
fileInput.addEventListener("change", () => setFile(fileInput.files[0]));
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  if (!e.dataTransfer.files.length) return;
  fileInput.files = e.dataTransfer.files;  // the input names the dropped file, as if it had been chosen
  setFile(e.dataTransfer.files[0]);
});
form.addEventListener("change", (e) => { if (e.target.name === "task") syncTask(); });
form.addEventListener("submit", run);
$("png").addEventListener("click", annotatedPng);
syncTask();

// The served model, in the header line (again once an API key is typed in, if the server wants one).
function showModel() {
  fetch("/v1/models", { headers: auth() }).then((r) => r.ok ? r.json() : null).then((m) => {
    if (m) $("model").textContent = `${m.name} · ${m.size} · step ${m.step ?? "?"} · ${m.backend} on ${m.device}`;
  }).catch(() => {});
}
$("api_key").addEventListener("change", showModel);
showModel();
