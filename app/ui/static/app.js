// NormBench browser UI: datasets, a new-comparison form, a live job list and the job's live report.
// Plain JavaScript, no build step, no dependency. It talks to the API on this same origin only.
// The API key (when the server requires one) lives in sessionStorage and goes out as `Authorization: Bearer`,
// never in a URL; live progress is the job's Server-Sent Events stream read with fetch() (an EventSource
// cannot send that header). Text from the server is put into the page as text nodes, never as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "normbench.apiKey";
  const MAX_STREAMS = 4; // browsers allow six HTTP/1.1 connections per origin: leave room for other requests
  const REPORT_RELOAD_MS = 3000; // the live report is rebuilt at most this often while events arrive
  const TERMINAL = new Set(["succeeded", "failed", "diverged", "cancelled"]);
  const JOB_DONE = new Set(["succeeded", "failed", "cancelled"]);
  const RUN_STATUSES = ["queued", "running", "succeeded", "diverged", "failed", "cancelled"];

  let catalogue = null;
  let pageAbort = null; // aborted when the view changes: its streams and requests stop
  let flash = "";
  let keyMessage = "";
  let returnTo = "#/jobs";
  let firstRoute = true;

  // ------------------------------------------------------------------ helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "value") el.value = v;
      else if (k === "checked") el.checked = Boolean(v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function announce(text) {
    const region = document.getElementById("announce");
    region.textContent = "";
    window.setTimeout(() => { region.textContent = text; }, 50);
  }

  function humanBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function fmtInt(n) { return Number(n).toLocaleString("en-US"); }

  function fmtDate(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
  }

  function pyRound(x) {
    // Python's round(): halves go to the even neighbour (the server's hold-out size uses it).
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  function gcd(a, b) { while (b) [a, b] = [b, a % b]; return a; }

  function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    const key = apiKey();
    if (key) headers.set("Authorization", "Bearer " + key);
    return headers;
  }

  class ApiError extends Error {
    constructor(status, kind, detail) {
      super(detail);
      this.status = status;
      this.kind = kind;
      this.detail = detail;
    }
  }

  function errorFrom(status, text, fallback) {
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch { body = null; }
    const detail = body && typeof body.detail === "string" ? body.detail : (text || fallback || "HTTP " + status);
    return new ApiError(status, (body && body.error) || "http_error", detail);
  }

  async function request(path, { method = "GET", body, signal, accept = "application/json" } = {}) {
    const headers = authHeaders({ Accept: accept });
    let payload;
    if (body !== undefined) {
      headers.set("Content-Type", "application/json");
      payload = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: payload, signal, credentials: "omit", cache: "no-store" });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "network", "the server could not be reached (" + e.message + "); is it running?");
    }
    if (!resp.ok) {
      const err = errorFrom(resp.status, await resp.text(), resp.statusText);
      if (resp.status === 401) unauthorized(err);
      throw err;
    }
    return resp;
  }

  async function api(path, options) {
    const resp = await request(path, options);
    if (resp.status === 204) return null;
    return resp.json();
  }

  function unauthorized(err) {
    keyMessage = err.detail;
    if (location.hash !== "#/key") {
      returnTo = location.hash || "#/jobs";
      location.hash = "#/key";
    }
  }

  function errorBox(id) { return h("p", { class: "error", id, role: "alert" }); }

  function showError(el, err) {
    if (err && err.name === "AbortError") return;
    el.textContent = err ? (err.detail || err.message || String(err)) : "";
  }

  function heading(text) { return h("h1", { tabindex: "-1" }, text); }

  // ------------------------------------------------------------------ live progress (SSE over fetch)

  // Reads one job's event stream until `job_finished`, reconnecting (as an EventSource would) when the
  // connection drops; `onEvent(name, data)` gets every event. Resolves once the job finished or `signal` aborts.
  async function followJob(jobId, signal, onEvent, onLive) {
    let retryMs = 3000;
    while (!signal.aborted) {
      let finished = false;
      try {
        const resp = await request("/v1/jobs/" + encodeURIComponent(jobId) + "/events", { signal, accept: "text/event-stream" });
        onLive(true);
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const event = parseEvent(block);
            if (event.retry) retryMs = event.retry;
            if (event.data === null) continue;
            let data;
            try { data = JSON.parse(event.data); } catch { continue; }
            onEvent(event.name, data);
            if (event.name === "job_finished") finished = true;
          }
        }
      } catch (e) {
        if (e.name === "AbortError" || signal.aborted) return;
        if (e instanceof ApiError && (e.status === 401 || e.status === 404 || e.status === 422)) { onLive(false); return; }
      }
      onLive(false);
      if (finished) return;
      await new Promise((resolve) => window.setTimeout(resolve, retryMs));
    }
  }

  function parseEvent(block) {
    const event = { name: "message", data: null, retry: 0 };
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event.name = value;
      else if (field === "data") data.push(value);
      else if (field === "retry" && /^\d+$/.test(value)) event.retry = Number(value);
    }
    if (data.length) event.data = data.join("\n");
    return event;
  }

  // A job's runs as its events describe them. The events are idempotent facts keyed by run and attempt, so a
  // replayed history (every stream starts with one) changes nothing.
  class RunTracker {
    constructor(runsTotal) {
      this.runsTotal = runsTotal;
      this.runs = new Map();
    }

    apply(name, d) {
      if (!d.run_id) return;
      const run = this.runs.get(d.run_id) || { attempt: -1, status: "queued", epoch: 0, epochsTotal: d.epochs_total || 0 };
      if (d.epochs_total) run.epochsTotal = d.epochs_total;
      if (name === "run_started" && d.attempt >= run.attempt) {
        run.attempt = d.attempt;
        run.status = "running";
      } else if (name === "epoch_done") {
        run.epoch = Math.max(run.epoch, d.epoch);
      } else if (name === "run_finished" && d.attempt >= run.attempt) {
        run.attempt = d.attempt;
        run.status = d.status;
      }
      this.runs.set(d.run_id, run);
    }

    summary() {
      const counts = Object.fromEntries(RUN_STATUSES.map((s) => [s, 0]));
      let done = 0;
      let finished = 0;
      for (const run of this.runs.values()) {
        counts[run.status] = (counts[run.status] || 0) + 1;
        if (TERMINAL.has(run.status)) { done += 1; finished += 1; }
        else if (run.epochsTotal) done += Math.min(1, run.epoch / run.epochsTotal);
      }
      counts.queued = Math.max(0, this.runsTotal - this.runs.size);
      return { counts, runs_finished: finished, fraction: this.runsTotal ? done / this.runsTotal : 0 };
    }
  }

  function countsText(counts) {
    const parts = RUN_STATUSES.filter((s) => counts[s]).map((s) => counts[s] + " " + s);
    return parts.length ? parts.join(" · ") : "no runs";
  }

  function statusBadge(status) {
    return h("span", { class: "status status-" + status, "data-status": status }, status);
  }

  // ------------------------------------------------------------------ views

  async function viewKey(main) {
    const keysOn = catalogue && catalogue.require_api_keys;
    const stored = apiKey();
    const input = h("input", { type: "password", id: "api-key", autocomplete: "off", spellcheck: "false", "aria-describedby": "api-key-hint key-error" });
    const err = errorBox("key-error");
    const note = h("p", { class: "notice", id: "key-notice", role: "status" });
    if (keyMessage) { err.textContent = keyMessage; keyMessage = ""; }
    const form = h("form", { class: "card", novalidate: true },
      h("div", { class: "field" },
        h("label", { for: "api-key" }, "API key"),
        h("span", { class: "hint", id: "api-key-hint" },
          "nb_… from your administrator (`normbench-admin create-key --owner NAME`). It is kept in this browser tab only " +
          "(sessionStorage) and sent as an Authorization header; closing the tab forgets it."),
        input),
      err, note,
      h("div", { class: "actions" },
        h("button", { type: "submit" }, "Use this key"),
        h("button", { type: "button", class: "secondary", id: "forget-key", disabled: !stored, onclick: () => {
          sessionStorage.removeItem(KEY_STORAGE);
          note.textContent = "The key was forgotten.";
          document.getElementById("forget-key").disabled = true;
        } }, "Forget the key")));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      err.textContent = "";
      note.textContent = "";
      const key = input.value.trim();
      if (!key) { err.textContent = "Paste a key first."; input.focus(); return; }
      sessionStorage.setItem(KEY_STORAGE, key);
      try {
        await api("/v1/datasets");
      } catch (e) {
        sessionStorage.removeItem(KEY_STORAGE);
        showError(err, e);
        input.setAttribute("aria-invalid", "true");
        input.focus();
        return;
      }
      input.value = "";
      flash = "The API key works; it is kept for this tab.";
      location.hash = returnTo && returnTo !== "#/key" ? returnTo : "#/jobs";
    });
    append(main, [
      heading("API key"),
      h("p", {}, keysOn
        ? "This server requires an API key for every request."
        : "This server runs without API keys (loopback only): nothing to enter. A key entered here is sent anyway."),
      h("p", { class: "muted", id: "key-state" }, stored ? "A key is stored for this tab." : "No key is stored for this tab."),
      form,
    ]);
  }

  // ---- datasets

  function uploadWithProgress(file, fields, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/v1/datasets");
      const key = apiKey();
      if (key) xhr.setRequestHeader("Authorization", "Bearer " + key);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); });
      xhr.addEventListener("load", () => {
        if (xhr.status >= 200 && xhr.status < 300) {
          try { resolve(JSON.parse(xhr.responseText)); } catch { resolve(null); }
          return;
        }
        const err = errorFrom(xhr.status, xhr.responseText, xhr.statusText);
        if (xhr.status === 401) unauthorized(err);
        reject(err);
      });
      const limit = catalogue ? " (the server accepts uploads up to " + humanBytes(catalogue.limits.max_upload_bytes) + ")" : "";
      xhr.addEventListener("error", () => reject(new ApiError(0, "network", "the upload stopped before the server answered" + limit)));
      xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "the upload was cancelled")));
      const form = new FormData();
      form.append("file", file, file.name);
      for (const [k, v] of Object.entries(fields)) if (v) form.append(k, v);
      xhr.send(form);
    });
  }

  function datasetShape(ds) { return ds.shape.join("×"); }

  function datasetSplits(ds) {
    return Object.entries(ds.split_sizes).map(([k, v]) => k + " " + fmtInt(v)).join(" · ");
  }

  function classesText(ds) {
    const names = ds.class_names.slice(0, 6).join(", ") + (ds.class_names.length > 6 ? ", …" : "");
    return ds.num_classes + " (" + names + ")";
  }

  async function viewDatasets(main, signal) {
    const nameInput = h("input", { type: "text", id: "ds-name", maxlength: 200, "aria-describedby": "ds-name-hint" });
    const labelInput = h("input", { type: "text", id: "ds-label", value: "label", maxlength: 200, "aria-describedby": "ds-label-hint" });
    const fileInput = h("input", { type: "file", id: "ds-file", accept: ".npz,.zip,.csv", "aria-describedby": "ds-formats" });
    const progress = h("progress", { id: "upload-progress", max: 1, value: 0, "aria-label": "Upload progress", hidden: true });
    const progressText = h("p", { class: "small muted", id: "upload-status", role: "status" });
    const err = errorBox("upload-error");
    const note = h("p", { class: "notice", id: "upload-notice" });
    const zone = h("div", { class: "dropzone", id: "dropzone" },
      h("p", { id: "ds-formats" }, "Drop a .npz (x, y; optional x_val/y_val, x_test/y_test), a .zip of class folders of " +
        "PNG/JPEG images, or a .csv with a label column here, or choose a file:"),
      h("label", { for: "ds-file", class: "visually-hidden" }, "Dataset file"),
      fileInput,
      progress, progressText);
    const listBox = h("div", { id: "dataset-list" }, h("p", { class: "muted" }, "Loading…"));
    const listErr = errorBox("dataset-list-error");

    async function start(file) {
      if (!file) return;
      err.textContent = "";
      note.textContent = "";
      progress.hidden = false;
      progress.value = 0;
      progressText.textContent = "Uploading " + file.name + " (" + humanBytes(file.size) + ")…";
      fileInput.disabled = true;
      try {
        const ds = await uploadWithProgress(file, { name: nameInput.value.trim(), label_column: labelInput.value.trim() },
          (loaded, total) => {
            progress.value = total ? loaded / total : 0;
            progressText.textContent = "Uploading " + file.name + ": " + Math.round(100 * progress.value) + "%" +
              (loaded >= total ? " — the server is checking the data…" : "");
          });
        progress.value = 1;
        progressText.textContent = "";
        note.textContent = "Stored " + ds.name + " (" + ds.id + "): " + ds.kind + " " + datasetShape(ds) + ", " +
          ds.num_classes + " classes, " + fmtInt(ds.num_samples) + " training samples.";
        announce(note.textContent);
        nameInput.value = "";
        await loadList();
      } catch (e) {
        progress.hidden = true;
        progressText.textContent = "";
        showError(err, e);
      } finally {
        fileInput.disabled = false;
        fileInput.value = "";
      }
    }

    fileInput.addEventListener("change", () => start(fileInput.files[0]));
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      const files = e.dataTransfer ? e.dataTransfer.files : null;
      if (!files || files.length !== 1) { err.textContent = "Drop exactly one file."; return; }
      start(files[0]);
    });

    async function remove(ds, cell) {
      const confirm = h("button", { type: "button", class: "danger", "data-confirm-delete": ds.id }, "Confirm: delete " + ds.name);
      const keep = h("button", { type: "button", class: "secondary" }, "Keep");
      const original = Array.from(cell.childNodes);
      keep.addEventListener("click", () => { cell.replaceChildren(...original); original[0].focus(); });
      confirm.addEventListener("click", async () => {
        listErr.textContent = "";
        try {
          await api("/v1/datasets/" + encodeURIComponent(ds.id), { method: "DELETE", signal });
          announce("Deleted " + ds.name);
          note.textContent = "Deleted " + ds.name + ".";
          await loadList();
        } catch (e) {
          showError(listErr, e);
          cell.replaceChildren(...original);
        }
      });
      cell.replaceChildren(confirm, " ", keep);
      confirm.focus();
    }

    async function loadList() {
      let items;
      try {
        items = (await api("/v1/datasets", { signal })).items;
      } catch (e) {
        showError(listErr, e);
        return;
      }
      if (!items.length) { listBox.replaceChildren(h("p", { class: "muted" }, "No datasets yet.")); return; }
      const rows = items.map((ds) => {
        const actions = h("td", { class: "actions" });
        append(actions, [h("a", { href: "#/new?dataset=" + encodeURIComponent(ds.id) }, "Compare on it")]);
        if (!ds.builtin) {
          const del = h("button", { type: "button", class: "danger", "aria-label": "Delete " + ds.name, "data-delete": ds.id }, "Delete");
          del.addEventListener("click", () => remove(ds, actions));
          append(actions, [" ", del]);
        }
        return h("tr", { "data-dataset": ds.id },
          h("td", {}, h("div", {}, ds.name), h("code", { class: "small" }, ds.id), ds.builtin ? h("span", { class: "hint" }, " built in") : null),
          h("td", {}, ds.kind),
          h("td", { class: "num" }, datasetShape(ds)),
          h("td", {}, classesText(ds)),
          h("td", {}, datasetSplits(ds)),
          h("td", { class: "num" }, humanBytes(ds.size_bytes)),
          h("td", {}, fmtDate(ds.created_at)),
          actions);
      });
      listBox.replaceChildren(h("table", {},
        h("caption", { class: "visually-hidden" }, "Datasets you can use"),
        h("thead", {}, h("tr", {}, ["Name", "Kind", "Shape", "Classes", "Splits", "Size", "Added", "Actions"].map((t) =>
          h("th", { scope: "col", class: t === "Shape" || t === "Size" ? "num" : null }, t)))),
        h("tbody", {}, rows)));
    }

    append(main, [
      heading("Datasets"),
      h("section", { class: "card", "aria-labelledby": "upload-h" },
        h("h2", { id: "upload-h" }, "Upload a dataset"),
        h("div", { class: "grid" },
          h("div", { class: "field" }, h("label", { for: "ds-name" }, "Name ", h("span", { class: "hint", id: "ds-name-hint" }, "(optional; defaults to the file name)")), nameInput),
          h("div", { class: "field" }, h("label", { for: "ds-label" }, "Label column ", h("span", { class: "hint", id: "ds-label-hint" }, "(CSV only)")), labelInput)),
        zone, err, note),
      h("section", { "aria-labelledby": "list-h" }, h("h2", { id: "list-h" }, "Your datasets"), listErr, listBox),
    ]);
    await loadList();
  }

  // ---- new comparison

  const SPEC_ROOTS = "dataset_id|name|model|variants|batch_sizes|seeds|budget|optimizer|augment|validation_fraction|log_every_steps|precision|equivalence_margin|pack_size";

  const ADVANCED = [
    // [id, spec path, label, kind, extra]
    ["opt-lr", "optimizer.lr", "Learning rate", "float", { step: "any" }],
    ["opt-ref", "optimizer.reference_batch_size", "Reference batch size (the rate applies at it)", "int", {}],
    ["opt-scaling", "optimizer.lr_scaling", "Rate scaling with batch size", "select", { options: ["linear", "sqrt", "none"] }],
    ["opt-momentum", "optimizer.momentum", "Momentum", "float", { step: "any" }],
    ["opt-wd", "optimizer.weight_decay", "Weight decay", "float", { step: "any" }],
    ["opt-warmup", "optimizer.warmup_epochs", "Warm-up epochs", "float", { step: "any" }],
    ["opt-schedule", "optimizer.schedule", "Schedule after warm-up", "select", { options: ["cosine", "constant"] }],
    ["precision", "precision", "Precision", "select", { options: ["fp32", "bf16"] }],
    ["aug-hflip", "augment.hflip", "Random horizontal flips (images)", "bool", {}],
    ["aug-crop", "augment.crop_padding", "Random-crop padding in pixels (images)", "int", {}],
    ["val-fraction", "validation_fraction", "Validation hold-out fraction (when no val split was uploaded)", "float", { step: "any" }],
    ["log-every", "log_every_steps", "Log the training loss every N steps", "int", {}],
    ["margin", "equivalence_margin", "Equivalence margin δ (accuracy fraction)", "float", { step: "any" }],
    ["pack-size", "pack_size", "Pack size (runs trained together; blank: the server's default)", "int", {}],
  ];

  function getPath(obj, path) {
    return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
  }

  function setPath(obj, path, value) {
    const keys = path.split(".");
    let o = obj;
    for (const k of keys.slice(0, -1)) o = o[k] = o[k] || {};
    o[keys[keys.length - 1]] = value;
  }

  function parseIntList(text) {
    const parts = text.split(/[\s,]+/).filter(Boolean);
    if (!parts.length) return { error: "enter at least one whole number" };
    const values = [];
    for (const p of parts) {
      if (!/^-?\d+$/.test(p)) return { error: "'" + p + "' is not a whole number; separate values with commas" };
      values.push(Number(p));
    }
    return { values };
  }

  async function viewNew(main, signal, query) {
    let datasets;
    const err = errorBox("form-error");
    try {
      datasets = (await api("/v1/datasets", { signal })).items;
    } catch (e) {
      append(main, [heading("New comparison"), err]);
      showError(err, e);
      return;
    }
    const defaults = catalogue.defaults;
    const fields = {}; // spec path -> { input, error }
    const variantRows = []; // { norm, check, params: {name: input}, error }

    function field(id, label, input, hint, path) {
      const error = h("p", { class: "error", id: id + "-error" });
      input.id = id;
      input.setAttribute("aria-describedby", [hint ? id + "-hint" : null, id + "-error"].filter(Boolean).join(" "));
      if (path) fields[path] = { input, error };
      return h("div", { class: "field", id: id + "-field" },
        input.type === "checkbox"
          ? h("div", {}, input, " ", h("label", { for: id }, label))
          : h("label", { for: id }, label),
        hint ? h("span", { class: "hint", id: id + "-hint" }, hint) : null,
        input.type === "checkbox" ? null : input,
        error);
    }

    const dsSelect = h("select", {}, datasets.map((ds) =>
      h("option", { value: ds.id, selected: query.get("dataset") === ds.id },
        ds.name + " — " + ds.kind + " " + datasetShape(ds) + ", " + ds.num_classes + " classes, " + fmtInt(ds.num_samples) + " samples")));
    const archSelect = h("select", {}, ["auto", "mlp", "cnn", "resnet", "cnn1d", "resnet1d", "transformer"].map((a) => h("option", { value: a }, a)));
    const archHint = h("span", {});
    const hidden = h("input", { type: "text", value: defaults.model.hidden.join(", "), inputmode: "numeric" });
    const width = h("input", { type: "number", min: 1, max: 256, value: defaults.model.width });
    const depth = h("select", {}, [8, 14, 20, 32, 44, 56, 110].map((d) => h("option", { value: d, selected: d === defaults.model.depth }, String(d))));
    const batchSizes = h("input", { type: "text", value: "2, 8, 32", inputmode: "numeric" });
    const seeds = h("input", { type: "text", value: "0, 1, 2", inputmode: "numeric" });
    const epochs = h("input", { type: "number", min: 1, max: catalogue.limits.max_epochs, value: defaults.budget.epochs });
    const name = h("input", { type: "text", maxlength: 200 });

    const variantsError = h("p", { class: "error", id: "variants-error" });
    const variantsBox = h("fieldset", { id: "variants", "aria-describedby": "variants-hint variants-error" },
      h("legend", {}, "Normalization variants"),
      h("p", { class: "hint", id: "variants-hint" }, "Tick the layers to compare; include BatchNorm (bn) as the baseline. " +
        "GroupNorm takes either a number of groups or a group size; a list (8, 16, 32) sweeps it, each value a variant of its own."));
    for (const norm of catalogue.norms) {
      const check = h("input", { type: "checkbox", id: "norm-" + norm.name, value: norm.name, checked: norm.name === "bn" || norm.name === "gn",
        "aria-describedby": "norm-" + norm.name + "-desc" });
      const params = {};
      const paramBoxes = norm.params.map((p) => {
        const info = catalogue.params[p];
        const id = "param-" + norm.name + "-" + p;
        const input = h("input", { type: "text", id, inputmode: "decimal", placeholder: info.default === null ? "default" : String(info.default),
          "aria-describedby": id + "-hint", disabled: !check.checked });
        params[p] = input;
        return h("span", { class: "param" },
          h("label", { for: id }, p.replace(/_/g, " ")), input,
          h("span", { class: "visually-hidden", id: id + "-hint" }, info.description + (info.sweep ? " One value or a comma-separated list." : "")));
      });
      const error = h("p", { class: "error", id: "norm-" + norm.name + "-error" });
      check.addEventListener("change", () => { for (const input of Object.values(params)) input.disabled = !check.checked; });
      variantRows.push({ norm: norm.name, check, params, error });
      append(variantsBox, [h("div", { class: "variant", "data-norm": norm.name },
        h("label", { for: "norm-" + norm.name }, check, " " + norm.title + " ", h("code", {}, norm.name)),
        h("span", { class: "visually-hidden", id: "norm-" + norm.name + "-desc" }, norm.description),
        paramBoxes, error)]);
    }
    append(variantsBox, [variantsError]);

    const advanced = h("details", { id: "advanced" }, h("summary", {}, "Advanced budget and training settings"));
    const advancedGrid = h("div", { class: "grid" });
    for (const [id, path, label, kind, extra] of ADVANCED) {
      const value = getPath(defaults, path);
      let input;
      if (kind === "select") input = h("select", {}, extra.options.map((o) => h("option", { value: o, selected: o === value }, o)));
      else if (kind === "bool") input = h("input", { type: "checkbox", checked: Boolean(value) });
      else input = h("input", { type: "number", step: kind === "int" ? 1 : extra.step, value: value === null ? "" : value });
      input.dataset.kind = kind;
      append(advancedGrid, [field(id, label, input, null, path)]);
    }
    append(advanced, [advancedGrid]);

    const estimate = h("div", { class: "summary", id: "estimate", role: "status", "aria-live": "polite" });
    const estimateError = h("p", { class: "error", id: "estimate-error" });
    const submit = h("button", { type: "submit", id: "submit-job" }, "Submit the comparison");

    const form = h("form", { novalidate: true, id: "new-job" },
      h("div", { class: "grid" },
        field("job-name", "Job name (optional)", name, null, "name"),
        field("dataset", "Dataset", dsSelect, null, "dataset_id")),
      h("fieldset", {}, h("legend", {}, "Network"),
        h("div", { class: "grid" },
          field("arch", "Architecture", archSelect, null, "model.arch"),
          field("hidden", "MLP hidden widths", hidden, "comma-separated, one norm layer each", "model.hidden"),
          field("width", "Width (channels of the first stage)", width, "CNN and ResNet", "model.width"),
          field("depth", "ResNet depth", depth, "6n+2", "model.depth")),
        h("p", { class: "hint", id: "arch-hint" }, archHint)),
      variantsBox,
      h("div", { class: "grid" },
        field("batch-sizes", "Batch sizes", batchSizes, "comma-separated, e.g. 2, 8, 32", "batch_sizes"),
        field("seeds", "Seeds", seeds, "comma-separated; each gives one run per variant and batch size", "seeds"),
        field("epochs", "Epochs", epochs, "passes over the training split; every run sees the same samples", "budget.epochs")),
      advanced,
      estimate, estimateError, err,
      h("div", { class: "actions" }, submit));

    function chosenDataset() { return datasets.find((d) => d.id === dsSelect.value); }

    // The network `auto` resolves to for the dataset's kind: the server's own table (catalogue.AUTO_ARCH).
    function autoArch(ds) { return (ds && catalogue.auto_arch[ds.kind]) || "cnn"; }

    function updateArch() {
      const ds = chosenDataset();
      let arch = archSelect.value;
      if (arch === "auto") arch = autoArch(ds);
      const info = catalogue.archs.find((a) => a.name === arch);
      const hint = (archSelect.value === "auto" ? "auto → " + arch + " for this dataset. " : "") + (info ? info.description : "");
      if (archHint.textContent !== hint) archHint.textContent = hint;
      document.getElementById("hidden-field").hidden = arch !== "mlp";
      document.getElementById("width-field").hidden = arch === "mlp";
      document.getElementById("depth-field").hidden = arch !== "resnet";
    }

    // Builds the spec from the form; local errors (a list that is not numbers) are returned, not sent.
    function buildSpec() {
      const local = [];
      const spec = { dataset_id: dsSelect.value, variants: [] };
      if (name.value.trim()) spec.name = name.value.trim();
      spec.model = { arch: archSelect.value };
      const ds = chosenDataset();
      const arch = archSelect.value === "auto" ? autoArch(ds) : archSelect.value;
      if (arch === "mlp") {
        const parsed = parseIntList(hidden.value);
        if (parsed.error) local.push(["model.hidden", parsed.error]); else spec.model.hidden = parsed.values;
      } else {
        spec.model.width = Number(width.value);
        if (arch === "resnet") spec.model.depth = Number(depth.value);
      }
      const order = [];
      for (const row of variantRows) {
        if (!row.check.checked) continue;
        const variant = { norm: row.norm };
        for (const [p, input] of Object.entries(row.params)) {
          const text = input.value.trim();
          if (!text) continue;
          const info = catalogue.params[p];
          if (info.sweep) {
            const parsed = parseIntList(text);
            if (parsed.error) { local.push(["variant:" + row.norm, p.replace(/_/g, " ") + ": " + parsed.error]); continue; }
            variant[p] = parsed.values.length === 1 ? parsed.values[0] : parsed.values;
          } else {
            const n = Number(text);
            if (!Number.isFinite(n)) { local.push(["variant:" + row.norm, p.replace(/_/g, " ") + ": '" + text + "' is not a number"]); continue; }
            variant[p] = n;
          }
        }
        spec.variants.push(variant);
        order.push(row.norm);
      }
      if (!spec.variants.length) local.push(["variants", "tick at least one normalization layer"]);
      for (const [path, input] of [["batch_sizes", batchSizes], ["seeds", seeds]]) {
        const parsed = parseIntList(input.value);
        if (parsed.error) local.push([path, parsed.error]); else spec[path] = parsed.values;
      }
      spec.budget = { epochs: epochs.value === "" ? null : Number(epochs.value) };
      for (const [, path, , kind] of ADVANCED) {
        const input = fields[path].input;
        if (kind === "bool") setPath(spec, path, input.checked);
        else if (kind === "select") setPath(spec, path, input.value);
        else if (input.value !== "") setPath(spec, path, Number(input.value));
      }
      return { spec, local, order };
    }

    function variantCount(v) {
      let n = 1;
      for (const p of ["groups", "group_size"]) if (Array.isArray(v[p])) n *= v[p].length;
      return n;
    }

    let estimateText = "";

    function updateEstimate() {
      const { spec, local } = buildSpec();
      const ds = chosenDataset();
      const nv = spec.variants.reduce((a, v) => a + variantCount(v), 0);
      const nb = (spec.batch_sizes || []).length;
      const ns = (spec.seeds || []).length;
      const runs = nv * nb * ns;
      const lines = [h("p", { id: "runs-count" }, h("strong", {}, fmtInt(runs) + " runs"),
        " = " + nv + " variant" + (nv === 1 ? "" : "s") + " × " + nb + " batch size" + (nb === 1 ? "" : "s") + " × " + ns + " seed" + (ns === 1 ? "" : "s"))];
      const ep = spec.budget.epochs;
      if (ds && nb && ep > 0 && !local.length) {
        const train = ds.split_sizes.train;
        const vf = spec.validation_fraction || defaults.validation_fraction;
        const trainSize = ds.split_sizes.val ? train : train - Math.max(1, pyRound(train * vf));
        const common = spec.batch_sizes.reduce((a, b) => (a * b) / gcd(a, b), 1);
        const perEpoch = common <= trainSize ? Math.floor(trainSize / common) * common : trainSize;
        const total = perEpoch * ep * runs;
        lines.push(h("p", { id: "work-estimate" }, "Work: about ", h("strong", {}, fmtInt(total) + " training samples"),
          " (" + fmtInt(runs) + " runs × " + fmtInt(ep) + " epochs × " + fmtInt(perEpoch) + " samples per epoch, a multiple of every batch size)."));
        if (total > catalogue.limits.max_train_samples_per_job) {
          lines.push(h("p", { class: "error" }, "Over this server's limit of " + fmtInt(catalogue.limits.max_train_samples_per_job) + " samples per job."));
        }
      }
      if (runs > catalogue.limits.max_runs_per_job) {
        lines.push(h("p", { class: "error" }, "Over this server's limit of " + fmtInt(catalogue.limits.max_runs_per_job) + " runs per job."));
      }
      // Only when the text changes: re-rendering on the `change` that a click's blur fires could move the button
      // between mousedown and mouseup, and the click would be lost.
      const text = lines.map((l) => l.textContent).join("\n");
      if (text !== estimateText) {
        estimateText = text;
        estimate.replaceChildren(...lines);
      }
    }

    function clearErrors() {
      for (const { input, error } of Object.values(fields)) { error.textContent = ""; input.removeAttribute("aria-invalid"); }
      for (const row of variantRows) row.error.textContent = "";
      variantsError.textContent = "";
      estimateError.textContent = "";
      err.textContent = "";
    }

    // Where the server's message belongs: its leading location (`batch_sizes: …`, `variants[1]: …`, `model.arch …`).
    function placeError(message, order) {
      const text = message.trim();
      const loc = text.replace(/\[(\d+)\]/g, ".$1");
      let m;
      if ((m = /^variant:(\w+)/.exec(loc))) {
        const row = variantRows.find((r) => r.norm === m[1]);
        return { el: row.error, text: text.slice(m[0].length + 1).trim(), focus: row.check };
      }
      if ((m = /^variants\.(\d+)/.exec(loc))) {
        const row = variantRows.find((r) => r.norm === order[Number(m[1])]);
        if (row) return { el: row.error, text, focus: row.check };
      }
      if (/^variants\b|variants must be distinct|variants expand to/.test(loc)) return { el: variantsError, text, focus: variantsBox.querySelector("input") };
      if (/^batch[ _]sizes?\b/.test(loc)) return withField("batch_sizes", text);
      if (/^the spec expands to|^the job would train on/.test(loc)) return { el: estimateError, text, focus: epochs };
      if (/^augment/.test(loc)) return withField(/crop/.test(loc) ? "augment.crop_padding" : "augment.hflip", text);
      for (const path of Object.keys(fields).sort((a, b) => b.length - a.length)) {
        if (loc.startsWith(path) && !/\w/.test(loc.charAt(path.length))) return withField(path, text);
      }
      if (/^model\b/.test(loc)) return withField("model.arch", text);
      return { el: err, text, focus: null };
    }

    function withField(path, text) {
      const f = fields[path];
      f.input.setAttribute("aria-invalid", "true");
      return { el: f.error, text, focus: f.input };
    }

    function showErrors(messages, order) {
      let first = null;
      for (const message of messages) {
        const { el, text, focus } = placeError(message, order);
        el.textContent = el.textContent ? el.textContent + "\n" + text : text;
        if (!first && focus) first = focus;
      }
      if (first) first.focus();
    }

    form.addEventListener("input", (ev) => {
      // Editing a field clears what was said about it: a stale message beside a changed value misleads.
      const f = Object.values(fields).find((x) => x.input === ev.target);
      if (f) { f.error.textContent = ""; f.input.removeAttribute("aria-invalid"); }
      updateEstimate();
    });
    form.addEventListener("change", () => { updateArch(); updateEstimate(); });
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors();
      const { spec, local, order } = buildSpec();
      if (local.length) {
        showErrors(local.map(([path, msg]) => path + ": " + msg), order);
        return;
      }
      submit.disabled = true;
      try {
        const job = await api("/v1/jobs", { method: "POST", body: spec, signal });
        flash = "Submitted " + (job.name || "job") + " (" + job.id + "): " + job.progress.runs_total + " runs.";
        location.hash = "#/jobs";
      } catch (e) {
        if (e.name === "AbortError") return;
        if (e.status === 422) {
          const parts = e.detail.split(new RegExp("; (?=(?:" + SPEC_ROOTS + ")\\b[\\w.\\[\\]]*:)"));
          showErrors(parts, order);
          announce("The server refused the comparison: " + e.detail);
        } else {
          showError(err, e);
        }
      } finally {
        submit.disabled = false;
      }
    });

    append(main, [heading("New comparison"),
      h("p", { class: "muted" }, "Every run trains on the same samples (a fixed budget); the report compares every variant " +
        "against the baseline at each batch size."), form]);
    updateArch();
    updateEstimate();
  }

  // ---- jobs

  async function viewJobs(main, signal) {
    const note = h("p", { class: "notice", role: "status" }, flash);
    flash = "";
    const err = errorBox("jobs-error");
    const pills = h("ul", { class: "pills", id: "job-counts", "aria-label": "Jobs by status" });
    const box = h("div", { id: "job-list" }, h("p", { class: "muted" }, "Loading…"));
    append(main, [heading("Jobs"), note, pills, err, box,
      h("p", { class: "hint" }, "Progress arrives live from each unfinished job's event stream (up to " + MAX_STREAMS + " at once).")]);

    let jobs;
    try {
      jobs = (await api("/v1/jobs", { signal })).items;
    } catch (e) {
      showError(err, e);
      box.replaceChildren();
      return;
    }
    if (!jobs.length) {
      box.replaceChildren(h("p", {}, "No jobs yet. ", h("a", { href: "#/new" }, "Start a comparison"), "."));
      return;
    }
    const rows = new Map();
    const waiting = [];
    let streaming = 0;

    function updatePills() {
      const counts = {};
      for (const r of rows.values()) counts[r.job.status] = (counts[r.job.status] || 0) + 1;
      pills.replaceChildren(...Object.entries(counts).map(([s, n]) => h("li", { "data-count": s }, n + " " + s)));
    }

    function render(r) {
      const job = r.job;
      const live = r.tracker ? r.tracker.summary() : null;
      const p = live && r.tracker.runs.size ? live : job.progress;
      r.status.replaceChildren();
      append(r.status, [statusBadge(job.status), r.cancelling && !JOB_DONE.has(job.status) ? h("div", { class: "small" }, "cancelling…") : null]);
      r.bar.value = p.fraction;
      r.pct.textContent = Math.round(100 * p.fraction) + "%";
      r.counts.textContent = p.runs_finished + "/" + job.progress.runs_total + " finished · " + countsText(p.counts);
      r.live.textContent = r.streaming ? "● live" : "";
      r.cancel.disabled = JOB_DONE.has(job.status) || r.cancelling;
      r.retry.disabled = !(job.status === "failed" || job.status === "cancelled");
      updatePills();
    }

    async function refresh(r) {
      try {
        r.job = await api("/v1/jobs/" + encodeURIComponent(r.job.id), { signal });
      } catch (e) {
        showError(err, e);
      }
      render(r);
    }

    function follow(r) {
      if (streaming >= MAX_STREAMS) { if (!waiting.includes(r)) waiting.push(r); return; }
      streaming += 1;
      r.tracker = new RunTracker(r.job.progress.runs_total);
      followJob(r.job.id, signal, (name, data) => {
        r.tracker.apply(name, data);
        if (name === "job_finished") r.job.status = data.status;
        else if (r.job.status === "queued" && name === "run_started") r.job.status = "running";
        render(r);
      }, (on) => { r.streaming = on; render(r); }).then(async () => {
        streaming -= 1;
        if (signal.aborted) return;
        await refresh(r); // the server's final word on the job
        const next = waiting.shift();
        if (next) follow(next);
      });
    }

    async function act(r, what) {
      err.textContent = "";
      try {
        r.job = await api("/v1/jobs/" + encodeURIComponent(r.job.id) + "/" + what, { method: "POST", signal });
        announce((what === "cancel" ? "Cancelling " : "Retrying ") + (r.job.name || r.job.id));
        // A cancelled job stays `running` until its running runs have stopped (within seconds; the stream says when).
        r.cancelling = what === "cancel";
        if (what === "retry") follow(r);
      } catch (e) {
        showError(err, e);
      }
      render(r);
    }

    const tbody = h("tbody", {});
    for (const job of jobs) {
      const label = job.name || "job " + job.id;
      const r = {
        job,
        tracker: null,
        streaming: false,
        status: h("td", {}),
        bar: h("progress", { max: 1, value: 0, "aria-label": "Progress of " + label }),
        pct: h("span", { class: "small" }),
        counts: h("div", { class: "counts" }),
        live: h("span", { class: "live" }),
        cancel: h("button", { type: "button", class: "secondary", "aria-label": "Cancel " + label, "data-action": "cancel" }, "Cancel"),
        retry: h("button", { type: "button", class: "secondary", "aria-label": "Retry " + label, "data-action": "retry" }, "Retry"),
      };
      r.cancel.addEventListener("click", () => act(r, "cancel"));
      r.retry.addEventListener("click", () => act(r, "retry"));
      rows.set(job.id, r);
      append(tbody, [h("tr", { "data-job": job.id },
        h("td", {}, h("a", { href: "#/jobs/" + encodeURIComponent(job.id) }, label), h("div", {}, h("code", { class: "small" }, job.id))),
        h("td", {}, job.dataset_id),
        r.status,
        h("td", {}, r.bar, " ", r.pct, " ", r.live, r.counts),
        h("td", {}, fmtDate(job.created_at)),
        h("td", {}, h("div", { class: "actions" }, r.cancel, r.retry, h("a", { href: "#/jobs/" + encodeURIComponent(job.id), "aria-label": "Report of " + label }, "Report"))))]);
      render(r);
    }
    box.replaceChildren(h("table", {},
      h("caption", { class: "visually-hidden" }, "Your jobs, newest first"),
      h("thead", {}, h("tr", {}, ["Job", "Dataset", "Status", "Progress", "Submitted", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
      tbody));
    for (const r of rows.values()) if (!JOB_DONE.has(r.job.status)) follow(r);
  }

  // ---- one job: live header + the report

  async function viewJob(main, signal, query, jobId) {
    const err = errorBox("job-error");
    const back = h("p", {}, h("a", { href: "#/jobs" }, "← All jobs"));
    let job;
    try {
      job = await api("/v1/jobs/" + encodeURIComponent(jobId), { signal });
    } catch (e) {
      append(main, [back, heading("Job " + jobId), err]);
      showError(err, e);
      return;
    }
    const label = job.name || "Job " + job.id;
    const status = h("span", { id: "job-status" });
    const bar = h("progress", { max: 1, value: 0, id: "job-progress", "aria-label": "Progress of " + label });
    const counts = h("span", { class: "counts", id: "job-counts" });
    const live = h("span", { class: "live", id: "job-live" });
    const cancel = h("button", { type: "button", class: "secondary", id: "job-cancel" }, "Cancel");
    const retry = h("button", { type: "button", class: "secondary", id: "job-retry" }, "Retry");
    const frame = h("iframe", { class: "report-frame", id: "report-frame", title: "Report of " + label, src: "/ui/report-frame.html" });
    let tracker = null;
    let streamOn = false;
    let cancelling = false;

    function render() {
      const p = tracker && tracker.runs.size ? tracker.summary() : job.progress;
      status.replaceChildren();
      append(status, [statusBadge(job.status), cancelling && !JOB_DONE.has(job.status) ? " cancelling…" : null]);
      bar.value = p.fraction;
      counts.textContent = Math.round(100 * p.fraction) + "% · " + p.runs_finished + "/" + job.progress.runs_total + " runs finished · " + countsText(p.counts);
      live.textContent = streamOn ? "● live" : "";
      cancel.disabled = JOB_DONE.has(job.status) || cancelling;
      retry.disabled = !(job.status === "failed" || job.status === "cancelled");
    }

    const frameReady = new Promise((resolve) => frame.addEventListener("load", resolve, { once: true }));
    let reloading = null;
    let lastReload = 0;
    let pending = null;

    async function loadReport() {
      const resp = await request("/v1/jobs/" + encodeURIComponent(job.id) + "/report?refresh=0", { signal, accept: "text/html" });
      const html = await resp.text();
      await frameReady;
      // Parsed by the frame's own DOMParser, under the frame's policy (the report's inline CSS is allowed there,
      // not in this page); nothing in it can run: the frame allows no script at all.
      const parsed = new frame.contentWindow.DOMParser().parseFromString(html, "text/html");
      for (const el of parsed.querySelectorAll("script, meta[http-equiv], base")) el.remove();
      const doc = frame.contentDocument;
      doc.replaceChild(doc.importNode(parsed.documentElement, true), doc.documentElement);
      for (const a of doc.querySelectorAll("a[href]")) {
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        a.addEventListener("click", (e) => {
          if (!apiKey() || !a.getAttribute("href").startsWith("/")) return;
          e.preventDefault(); // keys on: the link needs the key, so fetch it here and hand the browser the bytes
          openWithKey(a.getAttribute("href")).catch((x) => showError(err, x));
        });
      }
      frame.style.height = (doc.documentElement.scrollHeight + 24) + "px";
      lastReload = Date.now();
    }

    function scheduleReport() {
      if (pending || reloading) { pending = pending || true; return; }
      const wait = Math.max(0, lastReload + REPORT_RELOAD_MS - Date.now());
      pending = window.setTimeout(async () => {
        pending = null;
        reloading = loadReport().catch((e) => showError(err, e));
        await reloading;
        reloading = null;
        if (pending === true) { pending = null; scheduleReport(); }
      }, wait);
    }

    function follow() {
      tracker = new RunTracker(job.progress.runs_total);
      followJob(job.id, signal, (name, data) => {
        tracker.apply(name, data);
        if (name === "job_finished") job.status = data.status;
        else if (job.status === "queued" && name === "run_started") job.status = "running";
        render();
        if (name !== "run_started") scheduleReport();
      }, (on) => { streamOn = on; render(); }).then(async () => {
        if (signal.aborted) return;
        try { job = await api("/v1/jobs/" + encodeURIComponent(job.id), { signal }); } catch (e) { showError(err, e); }
        render();
        scheduleReport();
      });
    }

    async function act(what) {
      err.textContent = "";
      try {
        job = await api("/v1/jobs/" + encodeURIComponent(job.id) + "/" + what, { method: "POST", signal });
        announce((what === "cancel" ? "Cancelling " : "Retrying ") + label);
        cancelling = what === "cancel";
        if (what === "retry") follow();
      } catch (e) {
        showError(err, e);
      }
      render();
    }
    cancel.addEventListener("click", () => act("cancel"));
    retry.addEventListener("click", () => act("retry"));

    append(main, [back, heading(label),
      h("div", { class: "jobhead" }, status, bar, counts, live, h("div", { class: "actions" }, cancel, retry)),
      err, frame]);
    render();
    try {
      await loadReport();
    } catch (e) {
      showError(err, e);
    }
    if (!JOB_DONE.has(job.status)) follow();
  }

  async function openWithKey(path) {
    const resp = await request(path, { accept: "*/*" });
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    const disposition = resp.headers.get("Content-Disposition") || "";
    const m = /filename="?([^";]+)"?/.exec(disposition);
    if (m) {
      const a = h("a", { href: url, download: m[1] });
      document.body.append(a);
      a.click();
      a.remove();
    } else {
      window.open(url, "_blank", "noopener");
    }
    window.setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  // ------------------------------------------------------------------ routing

  const ROUTES = [
    [/^#\/datasets$/, viewDatasets, "datasets"],
    [/^#\/new$/, viewNew, "new"],
    [/^#\/jobs$/, viewJobs, "jobs"],
    [/^#\/jobs\/([\w.-]+)$/, viewJob, "jobs"],
    [/^#\/key$/, viewKey, "key"],
  ];

  async function route() {
    if (pageAbort) pageAbort.abort();
    pageAbort = new AbortController();
    const signal = pageAbort.signal;
    const [path, queryText] = (location.hash || "#/jobs").split("?");
    const query = new URLSearchParams(queryText || "");
    let view = viewJobs;
    let nav = "jobs";
    let args = [];
    for (const [pattern, fn, section] of ROUTES) {
      const m = pattern.exec(path);
      if (m) { view = fn; nav = section; args = m.slice(1).map(decodeURIComponent); break; }
    }
    for (const a of document.querySelectorAll("nav a[data-nav]")) {
      if (a.dataset.nav === nav) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    const main = document.getElementById("main");
    main.replaceChildren();
    const focusHeading = !firstRoute;
    firstRoute = false;
    const done = view(main, signal, query, ...args);
    const h1 = main.querySelector("h1");
    if (focusHeading && h1) h1.focus();
    try {
      await done;
    } catch (e) {
      if (e.name !== "AbortError") {
        main.append(h("p", { class: "error", role: "alert" }, e.detail || e.message || String(e)));
      }
    }
    const title = main.querySelector("h1");
    document.title = (title ? title.textContent + " · " : "") + "NormBench";
    if (focusHeading && title && !main.contains(document.activeElement)) title.focus();
  }

  async function start() {
    try {
      const resp = await fetch("/ui/catalogue.json", { cache: "no-store", credentials: "omit" });
      catalogue = await resp.json();
    } catch (e) {
      document.getElementById("main").replaceChildren(h("p", { class: "error", role: "alert" }, "The server could not be reached: " + e.message));
      return;
    }
    window.addEventListener("hashchange", route);
    await route();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
