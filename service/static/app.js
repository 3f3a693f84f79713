// The web page of the Glow service: plain JavaScript against the HTTP API (shared/docs/API.md).
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLES = 16;
let prefix = ""; // "" serves the default model; "/models/NAME" another one (GET /models lists them)

function status(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// fetch -> JSON, or an Error carrying the API's {"detail": ...} and the status code
async function api(path, options = {}) {
  const response = await fetch(prefix + path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.detail || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

const png = (base64) => `data:image/png;base64,${base64}`;

function imageFiles(list) {
  return Array.from(list || []).filter((file) => /^image\/(png|jpeg)$/.test(file.type));
}

// ------------------------------------------------------------------ models
async function loadModels() {
  const response = await fetch("/models");
  if (!response.ok) return; // one model: the routes without a prefix serve it (404 before multi-model serving)
  const { models } = await response.json();
  if (!Array.isArray(models) || models.length < 2) return;
  const select = $("model-select");
  for (const model of models) {
    const option = new Option(`${model.name} (${model.dataset})`, model.name, model.default, model.default);
    select.add(option);
  }
  select.addEventListener("change", () => {
    prefix = `/models/${encodeURIComponent(select.value)}`;
    refresh();
  });
  $("model-picker").hidden = false;
}

// -------------------------------------------------------------- model card
const CARD = [
  ["name", "name"], ["dataset", "dataset"], ["image shape [C, H, W]", "image_shape"],
  ["test bits/dim (dequantised)", "test_bits_per_dim"], ["test bits/dim (as served)", "test_bits_per_dim_bin_centre"],
  ["levels x steps", (m) => `${m.levels} x ${m.steps_per_level}`], ["width", "hidden_channels"],
  ["parameters", (m) => m.parameters.toLocaleString("en")], ["anomaly score", (m) => m.anomaly && m.anomaly.method],
  ["threshold", (m) => m.anomaly && m.anomaly.threshold.toFixed(3)],
  ["flagged in-distribution", (m) => m.anomaly && `${(100 * m.anomaly.false_positive_rate).toFixed(1)}%`],
  ["device, dtype", (m) => `${m.device}, ${m.dtype}`], ["weights sha256", "weights_sha256"],
];

async function loadCard() {
  const model = await api("/model");
  const card = $("model-card");
  card.replaceChildren();
  for (const [label, field] of CARD) {
    const value = typeof field === "function" ? field(model) : model[field];
    if (value === undefined || value === null) continue;
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = Array.isArray(value) ? value.join(" x ") : String(value);
    card.append(dt, dd);
  }
  return model;
}

// ------------------------------------------------------------------ scores
async function score(files) {
  files = imageFiles(files);
  if (!files.length) {
    status("no PNG or JPEG image among those", true);
    return;
  }
  const form = new FormData();
  files.forEach((file) => form.append("images", file, file.name));
  status(`scoring ${files.length} image(s)...`);
  let body;
  try {
    body = await api("/log-likelihood?resize=true&heatmap_overlay=true", { method: "POST", body: form });
  } catch (error) {
    if (error.status !== 422 || !/heatmap/.test(error.message)) return status(error.message, true);
    body = await api("/log-likelihood?resize=true", { method: "POST", body: form }).catch((e) => status(e.message, true));
    if (!body) return;
  }
  const list = $("score-results");
  body.results.forEach((result, index) => list.prepend(renderScore(files[index], result)));
  status(`scored ${files.length} image(s)`);
}

function renderScore(file, result) {
  const item = document.createElement("li");
  item.className = "result";
  const verdict = result.is_anomaly ? "anomalous" : "typical";
  item.dataset.verdict = verdict;
  const images = document.createElement("div");
  images.className = "images";
  const original = document.createElement("img");
  original.className = "pixelated";
  original.src = URL.createObjectURL(file);
  original.alt = file.name;
  images.append(original);
  if (result.heatmap_overlay) {
    const heat = document.createElement("img");
    heat.className = "pixelated";
    heat.src = png(result.heatmap_overlay);
    heat.alt = `heatmap of ${file.name}: red where the model finds it unusual`;
    images.append(heat);
  }
  const facts = document.createElement("dl");
  const rows = [
    ["file", file.name],
    ["verdict", verdict],
    ["percentile", `${result.percentile.toFixed(1)}`],
    ["anomaly score", result.anomaly_score.toFixed(2)],
    ["bits/dim", result.bits_per_dim.toFixed(3)],
  ];
  if (result.predicted_label !== undefined) {
    const p = Math.max(...result.label_probabilities);
    rows.push(["predicted class", `${result.predicted_label} (${(100 * p).toFixed(1)}%)`]);
  }
  for (const [label, value] of rows) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = value;
    if (label === "verdict") dd.className = `verdict ${verdict}`;
    facts.append(dt, dd);
  }
  item.append(images, facts);
  return item;
}

function setUpScoring() {
  const zone = $("drop-zone");
  const picker = $("score-files");
  zone.addEventListener("click", () => picker.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      picker.click();
    }
  });
  picker.addEventListener("change", () => {
    score(picker.files);
    picker.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    score(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = imageFiles(Array.from(event.clipboardData.items, (item) => item.getAsFile()).filter(Boolean));
    if (files.length) score(files);
  });
}

// ----------------------------------------------------------------- samples
let sampleTimer = null;
let sampleRequest = 0;

async function drawSamples() {
  const temperature = Number($("temperature").value);
  const seed = Math.max(0, Math.floor(Number($("seed").value) || 0));
  const label = $("label-select").value;
  const request = ++sampleRequest;
  try {
    const query = `n=${SAMPLES}&temperature=${temperature}&seed=${seed}` +
      (label ? `&label=${encodeURIComponent(label)}` : "");
    const body = await api(`/sample?${query}`);
    if (request !== sampleRequest) return; // a newer request is on its way
    const grid = $("sample-grid");
    grid.replaceChildren(...body.images.map((image, index) => {
      const img = document.createElement("img");
      img.src = png(image);
      img.alt = `sample ${index + 1} at temperature ${body.temperature}, seed ${body.seed}`;
      return img;
    }));
    grid.dataset.temperature = String(body.temperature);
    grid.dataset.seed = String(body.seed);
    grid.dataset.label = label;
  } catch (error) {
    status(error.message, true);
  }
}

function setUpSamples() {
  const slider = $("temperature");
  const show = () => { $("temperature-value").textContent = Number(slider.value).toFixed(2); };
  const soon = () => {
    clearTimeout(sampleTimer);
    sampleTimer = setTimeout(drawSamples, 150);
  };
  slider.addEventListener("input", () => { show(); soon(); });
  $("seed").addEventListener("change", soon);
  $("label-select").addEventListener("change", soon);
  $("sample-form").addEventListener("submit", (event) => {
    event.preventDefault();
    drawSamples();
  });
  show();
}

// -------------------------------------------------------------- round trip
function loaded(img) {
  return img.complete && img.naturalWidth ? Promise.resolve() : new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("the image could not be shown"));
  });
}

function greyPixels(img) {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
  return Array.from({ length: rgba.length / 4 }, (_, i) => rgba[4 * i]);
}

async function roundTrip(file) {
  if (!file) return;
  const form = new FormData();
  form.append("images", file, file.name);
  const result = $("roundtrip-result");
  result.textContent = "encoding...";
  delete result.dataset.same;
  try {
    const encoded = await api("/encode?resize=true", { method: "POST", body: form });
    const decoded = await api("/decode", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ latents: encoded.latents }),
    });
    const input = $("roundtrip-input");
    const output = $("roundtrip-output");
    input.src = URL.createObjectURL(file);
    output.src = png(decoded.images[0]);
    await Promise.all([loaded(input), loaded(output)]);
    if (input.naturalWidth !== output.naturalWidth || input.naturalHeight !== output.naturalHeight) {
      result.textContent = `the server resized the image to ${output.naturalWidth}x${output.naturalHeight}`;
      return;
    }
    const [a, b] = [greyPixels(input), greyPixels(output)];
    const differ = a.filter((value, i) => value !== b[i]).length;
    result.dataset.same = String(differ === 0);
    result.textContent = differ === 0
      ? `same pixels: all ${a.length} identical (latent of ${encoded.latent_dim} numbers)`
      : `${differ} of ${a.length} pixels differ`;
  } catch (error) {
    result.textContent = error.message;
  }
}

// -------------------------------------------------------------------- start
// A class-conditional model's classes in the sample form (GET /model lists them as labels).
function showLabels(labels) {
  const select = $("label-select");
  select.replaceChildren(new Option("any (the mixture)", ""), ...(labels || []).map((name) => new Option(name, name)));
  $("label-picker").hidden = !labels;
}

async function refresh() {
  try {
    const model = await loadCard();
    showLabels(model.labels);
    status(`serving ${model.name} (${model.dataset})`);
    await drawSamples();
  } catch (error) {
    status(`${error.message}`, true);
  }
}

async function start() {
  setUpScoring();
  setUpSamples();
  $("roundtrip-file").addEventListener("change", (event) => roundTrip(event.target.files[0]));
  await loadModels().catch(() => {});
  await refresh();
  document.body.dataset.ready = "true";
}

start();
