// The unik dashboard. It uses only the public REST API (docs/api.md), so anything it
// does a script can do too. Plain JS without a build step: the daemon serves this file as is.
"use strict";

const TOKEN_KEY = "unik.token";
// The tables must show a state change within 2 s; polling each second keeps that promise with
// plain GETs that carry the bearer token (EventSource could not send the header).
const POLL_MS = 1000;
const HIDDEN_POLL_MS = 5000;
const CONSOLE_LIMIT = 1 << 20; // characters kept in the console view; older output scrolls away
const EXIT_RE = /unik: (?:exit status (-?\d+)|killed by signal (\d+))/g;

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const view = {
  images: [],
  instances: [],
  volumes: [],
  volumesSupported: true,
  compilers: [],
  busy: new Map(), // row key -> what is being done to it ("stopping…"), shown until the call returns
  unauthorized: false,
};

// ---------------------------------------------------------------- talking to the daemon

function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

function messageFrom(status, statusText, text) {
  // The API's own {"message": ...} is the most useful thing to show; anything else as it came.
  try {
    const body = JSON.parse(text);
    if (body && typeof body.message === "string") return body.message;
  } catch {
    // not JSON: fall through
  }
  return text ? text.slice(0, 4000) : `${status} ${statusText || "error"}`;
}

async function errorFrom(response) {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // the body could not be read: the status alone must do
  }
  if (response.status === 401) noteUnauthorized();
  return new ApiError(response.status, messageFrom(response.status, response.statusText, text));
}

function withQuery(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") params.set(k, v);
  const qs = params.toString();
  return qs ? `${path}?${qs}` : path;
}

async function api(method, path, { json, query } = {}) {
  const init = { method, headers: authHeaders(), cache: "no-store" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(withQuery(path, query), init);
  } catch (e) {
    throw new ApiError(0, `the daemon cannot be reached (${e.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  noteAuthorized();
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// fetch() cannot report upload progress; XMLHttpRequest can, and still sends the token.
function upload(path, query, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", withQuery(path, query));
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : 0));
    xhr.upload.addEventListener("load", () => onProgress(-1, 0));
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        noteAuthorized();
        try {
          resolve(JSON.parse(xhr.responseText));
        } catch {
          resolve(xhr.responseText);
        }
        return;
      }
      if (xhr.status === 401) noteUnauthorized();
      reject(new ApiError(xhr.status, messageFrom(xhr.status, xhr.statusText, xhr.responseText)));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the daemon cannot be reached (upload failed)")));
    xhr.send(form);
  });
}

const ref = (s) => encodeURIComponent(s);

// ---------------------------------------------------------------- connection and messages

function setConnection(kind, text) {
  const el = $("connection");
  el.className = `conn conn-${kind}`;
  el.textContent = text;
}

function noteUnauthorized() {
  const message = token()
    ? "The saved token was refused: this daemon requires a valid token. Enter it under “API token”."
    : "This daemon requires a token: enter it under “API token” above.";
  setConnection("auth", "this daemon requires a token");
  if (!view.unauthorized) {
    view.unauthorized = true;
    showNotice(message);
  }
}

function noteAuthorized() {
  if (view.unauthorized) {
    view.unauthorized = false;
    hideNotice();
  }
}

function showNotice(message) {
  $("notice-text").textContent = message;
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
}

function outcome(id, kind, message) {
  const el = $(id);
  el.className = `span2 outcome outcome-${kind}`;
  el.textContent = message;
}

// ---------------------------------------------------------------- formatting

function esc(value) {
  return String(value ?? "").replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c],
  );
}

// A fixed format (not "3 s ago"): rows then change only when the data does, which keeps
// keyboard focus and screen readers undisturbed by the polling.
function when(created) {
  const d = new Date(created);
  if (Number.isNaN(d.getTime())) return esc(created);
  const pad = (n) => String(n).padStart(2, "0");
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const sameDay = d.toDateString() === new Date().toDateString();
  const text = sameDay ? time : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
  return `<time datetime="${esc(created)}" title="${esc(d.toString())}">${text}</time>`;
}

function shortId(id) {
  return String(id).slice(0, 12);
}

function button(action, key, label, name, extra = "") {
  return `<button type="button" data-action="${action}" data-key="${esc(key)}" aria-label="${esc(`${label} ${name}`)}" ${extra}>${esc(label)}</button>`;
}

function ports(instance) {
  const list = Array.isArray(instance.Ports) ? instance.Ports : [];
  return list.map((p) => `${p.HostPort}→${p.GuestPort}/${(p.Protocol || "tcp").toLowerCase()}`).join(", ");
}

// ---------------------------------------------------------------- tables

const rowHtml = new WeakMap();

// Rows are keyed and replaced only when their content changes, so a poll does not steal
// keyboard focus or reset a half-done interaction.
function renderRows(tbody, items, keyOf, htmlOf) {
  const focused = document.activeElement;
  const focusKey = focused && tbody.contains(focused) ? [focused.dataset.key, focused.dataset.action] : null;
  const existing = new Map([...tbody.rows].map((r) => [r.dataset.key, r]));
  const headings = [...tbody.parentElement.tHead.rows[0].cells].map((c) => c.textContent.trim());
  let previous = null;
  for (const item of items) {
    const key = keyOf(item);
    let row = existing.get(key);
    existing.delete(key);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.key = key;
    }
    const html = htmlOf(item);
    if (rowHtml.get(row) !== html) {
      row.innerHTML = html;
      rowHtml.set(row, html);
      // On a narrow window each row becomes a card whose cells name their column (style.css).
      [...row.cells].forEach((cell, n) => (cell.dataset.label = headings[n] || ""));
    }
    row.dataset.name = item.Name;
    const expected = previous ? previous.nextSibling : tbody.firstChild;
    if (row !== expected) tbody.insertBefore(row, expected);
    previous = row;
  }
  for (const row of existing.values()) row.remove();
  if (focusKey && !tbody.contains(document.activeElement)) {
    const again =
      tbody.querySelector(`button[data-key="${CSS.escape(focusKey[0] || "")}"][data-action="${focusKey[1]}"]`) ||
      tbody.querySelector(`button[data-key="${CSS.escape(focusKey[0] || "")}"]`);
    if (again) again.focus();
  }
}

function imageName(id) {
  const image = view.images.find((i) => i.Id === id);
  return image ? image.Name : shortId(id);
}

function instanceName(id) {
  const instance = view.instances.find((i) => i.Id === id);
  return instance ? instance.Name : shortId(id);
}

function isUp(state) {
  return state === "running" || state === "pending" || state === "paused";
}

function renderInstances() {
  renderRows($("instances-table").tBodies[0], view.instances, (i) => i.Id, (i) => {
    const busy = view.busy.get(i.Id);
    const state = busy ? `<span class="badge state-busy">${esc(busy)}</span>` : `<span class="badge state-${esc(i.State)}">${esc(i.State)}</span>`;
    // Started as a clone of a VM template: said next to the state, as `unik instances` does.
    const warm = i.StartedWarm ? ` <span class="muted">warm</span>` : "";
    const net = [i.IpAddress ? esc(i.IpAddress) : "", esc(ports(i))].filter(Boolean).join("<br>") || "—";
    const vols = view.volumes.filter((v) => v.Attachment === i.Id).map((v) => esc(v.Name)).join(", ") || "—";
    const dis = busy ? "disabled" : "";
    const lifecycle = isUp(i.State)
      ? button("stop", i.Id, "Stop", i.Name, dis)
      : button("start", i.Id, "Start", i.Name, dis);
    return (
      `<th scope="row"><span class="name">${esc(i.Name)}</span> <span class="muted id">${esc(shortId(i.Id))}</span></th>` +
      `<td class="state">${state}${warm}</td><td>${esc(imageName(i.ImageId))}</td><td>${net}</td><td>${vols}</td>` +
      `<td>${when(i.Created)}</td>` +
      `<td class="row-actions">${button("console", i.Id, "Console", i.Name)}${lifecycle}${button("delete-instance", i.Id, "Delete", i.Name, `class="danger" ${dis}`)}</td>`
    );
  });
  $("instances-empty").hidden = view.instances.length > 0;
}

function renderImages() {
  renderRows($("images-table").tBodies[0], view.images, (i) => i.Id, (i) => {
    const busy = view.busy.get(i.Id);
    return (
      `<th scope="row"><span class="name">${esc(i.Name)}</span></th>` +
      `<td>${esc(i.RunSpec?.Compiler || "—")}</td><td class="nowrap">${esc(i.SizeMb)} MB</td>` +
      `<td>${when(i.Created)}</td>` +
      `<td class="row-actions">${button("run-image", i.Id, "Run", i.Name)}${button("delete-image", i.Id, "Delete", i.Name, `class="danger" ${busy ? "disabled" : ""}`)}</td>`
    );
  });
  $("images-empty").hidden = view.images.length > 0;
  syncSelect($("run-image"), view.images.map((i) => i.Name), "no image yet");
}

function renderVolumes() {
  renderRows($("volumes-table").tBodies[0], view.volumes, (v) => v.Id, (v) => {
    const dis = view.busy.get(v.Id) ? "disabled" : "";
    const attach = v.Attachment
      ? button("detach", v.Id, "Detach", v.Name, dis)
      : button("attach", v.Id, "Attach", v.Name, dis);
    return (
      `<th scope="row"><span class="name">${esc(v.Name)}</span></th><td class="nowrap">${esc(v.SizeMb)} MB</td>` +
      `<td>${v.Attachment ? esc(instanceName(v.Attachment)) : "—"}</td><td>${when(v.Created)}</td>` +
      `<td class="row-actions">${attach}${button("delete-volume", v.Id, "Delete", v.Name, `class="danger" ${dis}`)}</td>`
    );
  });
  const empty = $("volumes-empty");
  empty.hidden = view.volumes.length > 0;
  empty.textContent = view.volumesSupported ? "No volumes." : "This daemon does not support volumes yet.";
}

function syncSelect(select, values, emptyLabel) {
  const current = [...select.options].map((o) => o.value);
  if (current.length === values.length && current.every((v, n) => v === values[n])) return;
  const chosen = select.value;
  select.replaceChildren(...values.map((v) => new Option(v, v)));
  if (values.length === 0) select.append(new Option(emptyLabel, "", true, true));
  if (values.includes(chosen)) select.value = chosen;
}

// ---------------------------------------------------------------- polling

let refreshing = false;

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const volumes = api("GET", "/volumes").catch((e) => {
      if (e.status === 501) return null; // a provider without volumes: not an error for the page
      throw e;
    });
    const [images, instances, vols] = await Promise.all([api("GET", "/images"), api("GET", "/instances"), volumes]);
    view.images = images || [];
    view.instances = instances || [];
    view.volumesSupported = vols !== null;
    view.volumes = vols || [];
    renderImages();
    renderInstances();
    renderVolumes();
    syncConsole();
    setConnection("ok", "connected");
    if (view.compilers.length === 0) loadCompilers();
  } catch (e) {
    if (e.status === 0) setConnection("down", "daemon unreachable");
    else if (e.status !== 401) setConnection("down", `error: ${e.message}`);
  } finally {
    refreshing = false;
  }
}

function schedule() {
  setTimeout(async () => {
    await refresh();
    schedule();
  }, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
}

async function loadCompilers() {
  try {
    view.compilers = (await api("GET", "/available_compilers")) || [];
    syncSelect($("build-compiler"), view.compilers, "no compiler available");
  } catch {
    // shown by the connection status; retried on the next successful poll
  }
  try {
    const info = await api("GET", "/version");
    $("daemon-version").textContent = info?.version ? `daemon ${info.version}` : "";
  } catch {
    // the version is decoration
  }
}

// ---------------------------------------------------------------- console

const consoleView = { id: null, name: "", text: "", controller: null, streaming: false, started: 0, error: "" };

function openConsole(instance) {
  stopStream();
  consoleView.id = instance.Id;
  consoleView.name = instance.Name;
  $("console-name").textContent = instance.Name;
  $("console-close").hidden = false;
  startStream();
}

function closeConsole() {
  stopStream();
  consoleView.id = null;
  $("console-name").textContent = "";
  $("console").textContent = "Choose “Console” on an instance to stream its output here.";
  $("console-state").textContent = "";
  $("console-state").className = "badge";
  $("console-exit").textContent = "";
  $("console-close").hidden = true;
}

function stopStream() {
  if (consoleView.controller) consoleView.controller.abort();
  consoleView.controller = null;
  consoleView.streaming = false;
}

function appendConsole(chunk) {
  if (!chunk) return;
  const pre = $("console");
  const clean = chunk.replace(/\r/g, "");
  consoleView.text += clean;
  if (consoleView.text.length > CONSOLE_LIMIT) {
    consoleView.text = consoleView.text.slice(-CONSOLE_LIMIT);
    pre.textContent = consoleView.text;
  } else {
    pre.append(clean);
  }
  if ($("console-autoscroll").checked) pre.scrollTop = pre.scrollHeight;
  updateConsoleHead();
}

// The follow stream goes on until the instance stops; it starts again from the whole log
// when the instance is started again (the console file is appended across boots).
async function startStream() {
  const id = consoleView.id;
  const controller = new AbortController();
  Object.assign(consoleView, { controller, streaming: true, started: Date.now(), text: "", error: "" });
  $("console").textContent = "";
  updateConsoleHead();
  try {
    const response = await fetch(`/instances/${ref(id)}/logs?follow=true`, {
      headers: authHeaders(),
      signal: controller.signal,
      cache: "no-store",
    });
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      appendConsole(decoder.decode(value, { stream: true }));
    }
    appendConsole(decoder.decode());
  } catch (e) {
    if (e.name === "AbortError") return;
    consoleView.error = e.message;
  } finally {
    if (consoleView.controller === controller) {
      consoleView.controller = null;
      consoleView.streaming = false;
      updateConsoleHead();
    }
  }
}

function syncConsole() {
  if (!consoleView.id) return;
  const instance = view.instances.find((i) => i.Id === consoleView.id);
  if (!instance) {
    stopStream();
    updateConsoleHead();
    return;
  }
  const restartable = Date.now() - consoleView.started > 2000;
  if (isUp(instance.State) && !consoleView.streaming && restartable) startStream();
  else updateConsoleHead();
}

function lastExit(text) {
  let found = null;
  for (const m of text.matchAll(EXIT_RE)) found = m;
  if (!found) return null;
  // Only the end of the log counts: an older boot's exit line is followed by a newer boot's output.
  const after = text.slice(found.index + found[0].length).split("\n").filter((l) => l.trim());
  if (after.length > 3) return null;
  return found[1] !== undefined
    ? { text: `exit status ${found[1]}`, ok: found[1] === "0" }
    : { text: `killed by signal ${found[2]}`, ok: false };
}

function updateConsoleHead() {
  if (!consoleView.id) return;
  const instance = view.instances.find((i) => i.Id === consoleView.id);
  const badge = $("console-state");
  const state = instance ? instance.State : "deleted";
  badge.textContent = state + (consoleView.streaming ? " · live" : "");
  badge.className = `badge state-${state}`;
  const exit = $("console-exit");
  const ended = instance && !isUp(instance.State) ? lastExit(consoleView.text) : null;
  if (consoleView.error) {
    exit.textContent = consoleView.error;
    exit.className = "exit exit-bad";
  } else if (ended) {
    exit.textContent = `app ended: ${ended.text}`;
    exit.className = ended.ok ? "exit exit-ok" : "exit exit-bad";
  } else {
    exit.textContent = "";
    exit.className = "exit";
  }
}

// ---------------------------------------------------------------- dialogs

function confirmDialog(text, okLabel) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

function attachDialog(volume) {
  const dialog = $("attach-dialog");
  $("attach-title").textContent = `Attach volume ${volume.Name}`;
  syncSelect($("attach-instance"), view.instances.map((i) => i.Name), "no instance");
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) =>
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "ok" ? { instance: $("attach-instance").value, mount: $("attach-mount").value.trim() } : null),
      { once: true },
    ),
  );
}

// ---------------------------------------------------------------- actions

async function withBusy(key, label, work) {
  view.busy.set(key, label);
  renderAll();
  try {
    await work();
  } catch (e) {
    showNotice(e.message);
  } finally {
    view.busy.delete(key);
    await refresh();
    renderAll();
  }
}

function renderAll() {
  renderImages();
  renderInstances();
  renderVolumes();
}

async function deleteWithForce(kind, path, item, needsForce, question) {
  let force = false;
  if (needsForce) {
    force = await confirmDialog(question, `Force delete ${item.Name}`);
    if (!force) return;
  }
  await withBusy(item.Id, "deleting…", async () => {
    try {
      await api("DELETE", path, { query: force ? { force: "true" } : undefined });
    } catch (e) {
      if (e.status !== 409 || force) throw e;
      // The daemon knows best why it refused (a race, or instances of an image): ask again with its words.
      if (await confirmDialog(`${e.message}. Delete the ${kind} anyway?`, `Force delete ${item.Name}`)) {
        await api("DELETE", path, { query: { force: "true" } });
      }
    }
  });
}

async function onTableClick(event) {
  const target = event.target.closest("button[data-action]");
  if (!target) return;
  const key = target.dataset.key;
  const instance = view.instances.find((i) => i.Id === key);
  const image = view.images.find((i) => i.Id === key);
  const volume = view.volumes.find((v) => v.Id === key);
  switch (target.dataset.action) {
    case "console":
      if (instance) {
        openConsole(instance);
        $("console").focus({ preventScroll: true });
      }
      break;
    case "stop":
      await withBusy(key, "stopping…", () => api("POST", `/instances/${ref(key)}/stop`));
      break;
    case "start":
      await withBusy(key, "starting…", async () => {
        await api("POST", `/instances/${ref(key)}/start`);
        if (instance && consoleView.id !== key) openConsole(instance);
      });
      break;
    case "delete-instance":
      if (instance) {
        await deleteWithForce("instance", `/instances/${ref(key)}`, instance, isUp(instance.State),
          `Instance ${instance.Name} is ${instance.State}. Force-delete it? Its VM is powered off at once.`);
      }
      break;
    case "run-image":
      if (image) {
        $("run-image").value = image.Name;
        $("run-name").focus();
      }
      break;
    case "delete-image":
      if (image) {
        const users = view.instances.filter((i) => i.ImageId === image.Id).map((i) => i.Name);
        await deleteWithForce("image", `/images/${ref(key)}`, image, users.length > 0,
          `Image ${image.Name} has instances (${users.join(", ")}). Delete the image and those instances?`);
      }
      break;
    case "attach":
      if (volume) {
        const choice = await attachDialog(volume);
        if (choice && choice.instance && choice.mount) {
          await withBusy(key, "attaching…", () =>
            api("POST", `/volumes/${ref(key)}/attach/${ref(choice.instance)}`, { query: { mount: choice.mount } }));
        }
      }
      break;
    case "detach":
      await withBusy(key, "detaching…", () => api("POST", `/volumes/${ref(key)}/detach`));
      break;
    case "delete-volume":
      if (volume) {
        await deleteWithForce("volume", `/volumes/${ref(key)}`, volume, Boolean(volume.Attachment),
          `Volume ${volume.Name} is attached to ${instanceName(volume.Attachment)}. Detach and delete it?`);
      }
      break;
    default:
      break;
  }
}

function splitCompiler(name) {
  // Compiler names are base-lang-provider; a language may itself hold a dash.
  const parts = name.split("-");
  return { base: parts[0], lang: parts.slice(1, -1).join("-"), provider: parts[parts.length - 1] };
}

function showProgress(wrapId, barId, labelId, loaded, total) {
  $(wrapId).hidden = false;
  const bar = $(barId);
  if (loaded < 0) {
    // The upload is done; the daemon is now working (compiling, or filling a filesystem).
    bar.removeAttribute("value");
    if (labelId) $(labelId).textContent = "Uploaded; compiling…";
  } else if (total > 0) {
    bar.value = Math.round((loaded / total) * 100);
    if (labelId) $(labelId).textContent = `Uploading ${bar.value}% (${(loaded / 1048576).toFixed(1)} of ${(total / 1048576).toFixed(1)} MB)`;
  }
}

async function onBuild(event) {
  event.preventDefault();
  const file = $("build-file").files[0];
  const compiler = $("build-compiler").value;
  if (!file || !compiler) {
    outcome("build-outcome", "error", !file ? "Choose a .tar.gz of the sources." : "The daemon offers no compiler.");
    return;
  }
  const name = $("build-name").value.trim();
  const { base, lang, provider } = splitCompiler(compiler);
  const form = new FormData();
  form.append("tarfile", file, file.name);
  const query = { base, lang, provider, args: $("build-args").value, mounts: $("build-mounts").value.trim() };
  if ($("build-force").checked) query.force = "true";
  const submit = $("build-submit");
  submit.disabled = true;
  outcome("build-outcome", "pending", `Building ${name}…`);
  $("build-progress").value = 0;
  $("build-progress-label").textContent = "Uploading";
  try {
    const image = await upload(`/images/${ref(name)}/create`, query, form, (loaded, total) =>
      showProgress("build-progress-wrap", "build-progress", "build-progress-label", loaded, total));
    outcome("build-outcome", "ok", `Built ${image.Name} (${image.SizeMb} MB, ${image.RunSpec?.Compiler || compiler}).`);
    await refresh();
    $("run-image").value = image.Name;
  } catch (e) {
    outcome("build-outcome", "error", `Build failed: ${e.message}`);
  } finally {
    submit.disabled = false;
    $("build-progress-wrap").hidden = true;
  }
}

function parseEnv(text) {
  const env = {};
  text.split("\n").forEach((line, n) => {
    if (!line.trim()) return;
    const at = line.indexOf("=");
    if (at <= 0) throw new Error(`Environment line ${n + 1}: expected KEY=value`);
    env[line.slice(0, at).trim()] = line.slice(at + 1);
  });
  return env;
}

function parseMounts(text) {
  const mounts = {};
  for (const item of text.split(/[,\n]/).map((s) => s.trim()).filter(Boolean)) {
    const at = item.indexOf(":");
    if (at <= 0 || !item.slice(at + 1).startsWith("/")) throw new Error(`Volumes: “${item}” is not volume:/mount/point`);
    mounts[item.slice(at + 1)] = item.slice(0, at);
  }
  return mounts;
}

function parsePorts(text) {
  return text.split(/[,\s]+/).filter(Boolean).map((item) => {
    const m = /^(\d+):(\d+)(?:\/(tcp|udp))?$/i.exec(item);
    if (!m) throw new Error(`Published ports: “${item}” is not host:guest[/tcp|/udp]`);
    return { HostPort: Number(m[1]), GuestPort: Number(m[2]), Protocol: (m[3] || "tcp").toLowerCase() };
  });
}

async function onRun(event) {
  event.preventDefault();
  let body;
  try {
    body = {
      InstanceName: $("run-name").value.trim(),
      ImageName: $("run-image").value,
      Env: parseEnv($("run-env").value),
      Mounts: parseMounts($("run-volumes").value),
      MemoryMb: Number($("run-memory").value || 0),
    };
    const published = parsePorts($("run-ports").value);
    if (published.length) body.Ports = published;
    if ($("run-warm").checked) body.WarmStart = true;
    if (!body.ImageName) throw new Error("Build an image first: there is none to run.");
  } catch (e) {
    outcome("run-outcome", "error", e.message);
    return;
  }
  const submit = $("run-submit");
  submit.disabled = true;
  outcome("run-outcome", "pending", `Starting ${body.InstanceName}…`);
  try {
    const instance = await api("POST", "/instances/run", { json: body });
    outcome("run-outcome", "ok", `Started ${instance.Name} (${instance.State}).`);
    await refresh();
    openConsole(instance);
  } catch (e) {
    outcome("run-outcome", "error", `Run failed: ${e.message}`);
  } finally {
    submit.disabled = false;
  }
}

async function onCreateVolume(event) {
  event.preventDefault();
  const name = $("volume-name").value.trim();
  const file = $("volume-file").files[0];
  const size = $("volume-size").value;
  const query = { type: $("volume-type").value, size: size || undefined };
  const submit = $("volume-submit");
  submit.disabled = true;
  outcome("volume-outcome", "pending", `Creating ${name}…`);
  try {
    let volume;
    if (file) {
      if ($("volume-raw").checked) query.raw = "true";
      const form = new FormData();
      form.append("tarfile", file, file.name);
      volume = await upload(`/volumes/${ref(name)}`, query, form, (loaded, total) =>
        showProgress("volume-progress-wrap", "volume-progress", null, loaded, total));
    } else {
      volume = await api("POST", `/volumes/${ref(name)}`, { query });
    }
    outcome("volume-outcome", "ok", `Created ${volume.Name} (${volume.SizeMb} MB).`);
    await refresh();
  } catch (e) {
    outcome("volume-outcome", "error", `Create failed: ${e.message}`);
  } finally {
    submit.disabled = false;
    $("volume-progress-wrap").hidden = true;
  }
}

async function onDescribe() {
  const compiler = $("build-compiler").value;
  if (!compiler) return;
  const { base, lang, provider } = splitCompiler(compiler);
  try {
    $("describe-text").textContent = await api("GET", "/describe_compiler", { query: { base, lang, provider } });
    $("describe-dialog").showModal();
  } catch (e) {
    showNotice(e.message);
  }
}

// ---------------------------------------------------------------- start

function init() {
  $("token-input").value = token();
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token-input").value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
    view.unauthorized = false;
    hideNotice();
    loadCompilers();
    refresh();
    if (consoleView.id && !consoleView.streaming) startStream();
  });
  $("token-clear").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    $("token-input").value = "";
    refresh();
  });
  $("notice-close").addEventListener("click", hideNotice);
  for (const id of ["instances-table", "images-table", "volumes-table"]) $(id).addEventListener("click", onTableClick);
  $("build-form").addEventListener("submit", onBuild);
  $("build-describe").addEventListener("click", onDescribe);
  $("run-form").addEventListener("submit", onRun);
  $("volume-form").addEventListener("submit", onCreateVolume);
  $("console-close").addEventListener("click", closeConsole);
  $("console-close").hidden = true;
  $("console-autoscroll").addEventListener("change", () => {
    if ($("console-autoscroll").checked) $("console").scrollTop = $("console").scrollHeight;
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
  loadCompilers();
  refresh().then(schedule);
}

init();
