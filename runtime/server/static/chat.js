"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"), scroll: $("scroll"), empty: $("empty"), messages: $("messages"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), composer: $("composer"),
  system: $("system"), temperature: $("temperature"), temperatureRange: $("temperature-range"),
  topP: $("top-p"), topK: $("top-k"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  model: $("model"), modelSelect: $("model-select"), modelStatus: $("model-status"),
  newChat: $("new-chat"), settingsToggle: $("settings-toggle"), settingsForm: $("settings-form"),
  attach: $("attach"), imageInput: $("image-input"), attachments: $("attachments"),
};
const DEFAULTS = { system: "", temperature: "0.7", "top-p": "", "top-k": "", "max-tokens": "512", "api-key": "" };

// The conversation sent with every turn: {role, content} and a user turn's images (data: URLs), with what the
// page shows of each turn (el; for an answer also reasoning, state, tokens and meta), kept in local storage
// between visits.
let history = [];
let attached = []; // the images, as data: URLs, that go with the next message
let inflight = null; // the AbortController of the answer being streamed
let modelPromise = null;

// Reads a setting, or stores one and says whether it could.
function storage(key, value) {
  try {
    if (value === undefined) return localStorage.getItem("tristream." + key);
    localStorage.setItem("tristream." + key, value);
    return true;
  } catch (e) {
    return null; // storage can be disabled or full; settings and the conversation then last for the page only
  }
}

for (const input of [ui.system, ui.temperature, ui.topP, ui.topK, ui.maxTokens, ui.apiKey]) {
  input.value = storage(input.id) ?? DEFAULTS[input.id];
  input.addEventListener("input", () => storage(input.id, input.value));
}
ui.temperatureRange.value = ui.temperature.value;
ui.temperature.addEventListener("input", () => { ui.temperatureRange.value = ui.temperature.value; });
ui.temperatureRange.addEventListener("input", () => {
  ui.temperature.value = ui.temperatureRange.value;
  storage("temperature", ui.temperature.value);
});
ui.apiKey.addEventListener("change", () => { modelPromise = null; model().catch(() => {}); });
ui.modelSelect.addEventListener("change", () => storage("model", ui.modelSelect.value));

// Links in an answer open in a new tab, without access to this page.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// Markdown as sanitised HTML into target, its code blocks highlighted.
function renderMarkdown(target, text) {
  target.innerHTML = DOMPurify.sanitize(marked.parse(text));
  for (const code of target.querySelectorAll("pre code")) hljs.highlightElement(code);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(res) {
  let message = "";
  try {
    const body = JSON.parse(await res.text());
    message = (body.error && body.error.message) || (typeof body.detail === "string" ? body.detail : "");
  } catch (e) {
    // Not a JSON error body: the status says what is known.
  }
  message = `${res.status} ${message || res.statusText || "request failed"}`;
  if (res.status === 401) message += "\nSet the API key in Settings.";
  return message;
}

function setModelStatus(status, text, title) {
  ui.modelStatus.dataset.status = status;
  ui.model.textContent = text;
  ui.modelStatus.title = title || text;
}

// The served models; with LoRA adapters loaded, a selector offers the model and each adapter.
async function loadModel() {
  setModelStatus("pending", "connecting…");
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw new Error(await errorMessage(res));
    const body = await res.json();
    const models = (body.data || []).filter((m) => m && m.id);
    if (!models.length) throw new Error("The server lists no model.");
    const ids = models.map((m) => m.id);
    ui.modelSelect.replaceChildren(...models.map((m) => new Option(m.parent ? `${m.id} (LoRA)` : m.id, m.id)));
    ui.modelSelect.value = ids.includes(storage("model")) ? storage("model") : ids[0];
    ui.modelSelect.hidden = ids.length < 2;
    ui.model.hidden = ids.length > 1;
    setModelStatus("ok", ids[0]);
    return ids;
  } catch (e) {
    ui.modelSelect.hidden = true;
    ui.model.hidden = false;
    setModelStatus("error", e.message.startsWith("401") ? "API key needed" : "unavailable", e.message);
    throw e;
  }
}

// The model ids, fetched once; a failure is retried by the next call.
function model() {
  if (!modelPromise) modelPromise = loadModel().catch((e) => { modelPromise = null; throw e; });
  return modelPromise;
}

// The model or adapter picked, once the list is in.
async function pickedModel() {
  await model();
  return ui.modelSelect.value;
}

function nearBottom() {
  const s = ui.scroll;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 60;
}

function follow(stick) {
  if (stick) ui.scroll.scrollTop = ui.scroll.scrollHeight;
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function tool(label, title, onClick, className = "") {
  const button = element("button", "tool " + className, label);
  button.type = "button";
  button.title = title;
  button.addEventListener("click", onClick);
  return button;
}

// Shows what a tool did for a moment, then its own label again.
function flash(button, label) {
  const own = button.dataset.label || (button.dataset.label = button.textContent);
  button.textContent = label;
  setTimeout(() => { button.textContent = own; }, 1500);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (e) {
    // Without a secure context (plain http to another host) there is no clipboard API.
    const area = element("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied;
  }
}

function thumbnail(url) {
  const img = element("img", "thumb");
  img.src = url;
  img.alt = "Attached image";
  return img;
}

function addUserMessage(turn) {
  const el = element("div", "msg user");
  const tools = element("div", "tools");
  tools.append(tool("Edit", "Edit this message and ask again", () => editMessage(turn), "edit"));
  if (turn.images && turn.images.length) {
    const images = element("div", "images");
    images.append(...turn.images.map(thumbnail));
    el.append(images);
  }
  el.append(element("div", "content", turn.content), tools);
  ui.empty.hidden = true;
  ui.messages.append(el);
  follow(true);
  turn.el = el;
  return el;
}

// An assistant message whose parts grow as deltas arrive; it takes the place of `replacing` if given.
function addAssistantMessage(replacing) {
  const el = element("div", "msg assistant");
  el.dataset.state = "streaming";
  const content = element("div", "content");
  const text = document.createTextNode("");
  content.append(text);
  const markdown = element("div", "markdown");
  const error = element("div", "error");
  error.hidden = true;
  const meta = element("div", "meta");
  const tools = element("div", "tools");
  tools.append(
    tool("Copy", "Copy the answer's markdown", async (e) => flash(e.currentTarget, await copyText(text.data) ? "Copied" : "Copy failed"), "copy"),
    tool("Regenerate", "Answer the last message again", regenerate, "regen"),
    tool("Raw", "Show the answer as the model wrote it", (e) => {
      e.currentTarget.textContent = el.classList.toggle("raw") ? "Rendered" : "Raw";
    }, "raw"),
  );
  el.append(content, markdown, error, meta, tools);
  if (replacing) replacing.replaceWith(el);
  else ui.messages.append(el);
  ui.empty.hidden = true;
  follow(true);

  // The markdown is rendered again at most once a frame while the answer streams.
  let rendering = false;
  const render = () => {
    const stick = nearBottom();
    rendering = false;
    renderMarkdown(markdown, text.data);
    follow(stick);
  };
  // The reasoning block is made on the first reasoning delta: open while the model thinks, closed once it answers.
  let reasoning = null;
  let reasoningLabel = null;
  let reasoningText = null;
  return {
    el,
    content(delta) {
      if (reasoning && !text.length) {
        reasoning.open = false;
        reasoningLabel.textContent = "Reasoning";
      }
      text.appendData(delta);
      if (!rendering) {
        rendering = true;
        requestAnimationFrame(render);
      }
    },
    reasoning(delta) {
      const stick = nearBottom();
      if (!reasoning) {
        reasoning = element("details", "reasoning");
        reasoning.open = true;
        reasoningLabel = element("summary", "", "Thinking…");
        const body = element("div", "reasoning-text");
        reasoningText = document.createTextNode("");
        body.append(reasoningText);
        reasoning.append(reasoningLabel, body);
        el.insertBefore(reasoning, content);
      }
      reasoningText.appendData(delta);
      follow(stick);
    },
    text() { return text.data; },
    reasoningText() { return reasoningText ? reasoningText.data : ""; },
    error(message) {
      error.textContent = message;
      error.hidden = false;
    },
    finish(state, tokens, info) {
      render();
      if (reasoning) reasoningLabel.textContent = "Reasoning";
      el.dataset.state = state;
      el.dataset.tokens = tokens;
      meta.textContent = info;
    },
  };
}

// Reads a text/event-stream body and calls onData with each event's data; stops when onData returns true.
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    // At the end, the blank lines close a last line or event the server left unterminated.
    buffer += done ? decoder.decode() + "\n\n" : decoder.decode(value, { stream: true });
    // A trailing \r may be the first half of a \r\n that the next read completes.
    const keep = !done && buffer.endsWith("\r") ? 1 : 0;
    const lines = buffer.slice(0, buffer.length - keep).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(buffer.length - keep);
    for (const line of lines) {
      if (line === "") {
        if (data.length && onData(data.join("\n"))) {
          await reader.cancel();
          return;
        }
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
    }
    if (done) return;
  }
}

function readNumber(input, min, max) {
  const v = Number(input.value);
  return input.value.trim() === "" || !Number.isFinite(v) ? null : Math.min(max, Math.max(min, v));
}

// The sampling settings that are set, as request fields.
function sampling() {
  const fields = {};
  const temperature = readNumber(ui.temperature, 0, 2);
  const topP = readNumber(ui.topP, 0.01, 1);
  const topK = readNumber(ui.topK, 0, Number.MAX_SAFE_INTEGER);
  const maxTokens = readNumber(ui.maxTokens, 1, Number.MAX_SAFE_INTEGER);
  if (temperature !== null) fields.temperature = temperature;
  if (topP !== null) fields.top_p = topP;
  if (topK !== null) fields.top_k = Math.round(topK);
  if (maxTokens !== null) fields.max_tokens = Math.round(maxTokens);
  return fields;
}

function summary(stats, state) {
  const tokens = stats.usage ? stats.usage.completion_tokens : stats.chunks;
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  // The decode rate: the tokens after the first over the time after the first.
  if (tokens > 1 && stats.last > stats.first) {
    parts.push(`${((tokens - 1) / ((stats.last - stats.first) / 1000)).toFixed(1)} tok/s`);
  } else if (tokens && stats.last > stats.start) {
    parts.push(`${(tokens / ((stats.last - stats.start) / 1000)).toFixed(1)} tok/s`);
  }
  if (stats.first) parts.push(`first token ${((stats.first - stats.start) / 1000).toFixed(2)} s`);
  if (state === "stopped") parts.push("stopped");
  else if (stats.finish === "length") parts.push("max tokens reached");
  return { tokens, text: parts.join(" · ") };
}

// The conversation as local storage keeps it: with its images if they fit, else without them.
function saveConversation() {
  const turns = history.map(({ role, content, images, reasoning, state, tokens, meta }) => ({ role, content, images, reasoning, state, tokens, meta }));
  if (!storage("conversation", JSON.stringify(turns))) {
    storage("conversation", JSON.stringify(turns.map((turn) => ({ ...turn, images: undefined }))));
  }
}

// A turn as the chat completions API takes it: a user turn with images has its images, then its text, as parts.
function apiMessage({ role, content, images }) {
  if (!images || !images.length) return { role, content };
  const parts = images.map((url) => ({ type: "image_url", image_url: { url } }));
  return { role, content: content ? parts.concat({ type: "text", text: content }) : parts };
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The images waiting to go with the next message, each with a button that removes it.
function showAttachments() {
  ui.attachments.replaceChildren(...attached.map((url, i) => {
    const item = element("div", "attachment");
    const remove = tool("×", "Remove this image", () => {
      attached.splice(i, 1);
      showAttachments();
    }, "remove");
    remove.setAttribute("aria-label", "Remove image");
    item.append(thumbnail(url), remove);
    return item;
  }));
  ui.attachments.hidden = !attached.length;
  updateSend();
}

async function attachFiles(files) {
  attached = attached.concat(await Promise.all(Array.from(files, readImage)));
  showAttachments();
  ui.prompt.focus();
}

// Marks the last exchange, which Edit and Regenerate act on.
function markLast() {
  for (const el of ui.messages.querySelectorAll(".msg.last")) el.classList.remove("last");
  for (const turn of history.slice(-2)) turn.el.classList.add("last");
}

// Streams the answer to turns, which end with userTurn, into view. An answer, whole or stopped, joins the
// conversation; on a failure the user's turn leaves it and its text goes back into the box.
async function answer(turns, userTurn, view) {
  const controller = new AbortController();
  inflight = controller;
  setBusy(true);

  const stats = { start: performance.now(), first: 0, last: 0, chunks: 0, usage: null, finish: null };
  const onData = (data) => {
    if (data === "[DONE]") return true;
    let event;
    try {
      event = JSON.parse(data);
    } catch (e) {
      throw new Error("The server sent an unreadable event: " + data.slice(0, 200));
    }
    if (event.error) throw new Error(event.error.message || "The server reported an error.");
    if (event.usage) stats.usage = event.usage;
    const choice = event.choices && event.choices[0];
    if (!choice) return false;
    const delta = choice.delta || {};
    if (delta.reasoning_content) view.reasoning(delta.reasoning_content);
    if (delta.content) view.content(delta.content);
    if (delta.reasoning_content || delta.content) {
      stats.last = performance.now();
      if (!stats.chunks) stats.first = stats.last;
      stats.chunks++;
    }
    if (choice.finish_reason) stats.finish = choice.finish_reason;
    return false;
  };
  const finish = (state) => {
    if (!stats.last) stats.last = performance.now();
    const s = summary(stats, state);
    const meta = state === "error" && !stats.chunks ? "" : s.text;
    view.finish(state, s.tokens, meta);
    if (state !== "error") {
      turns.push({ role: "assistant", content: view.text(), reasoning: view.reasoningText(), state, tokens: s.tokens, meta, el: view.el });
    }
    if (turns === history) { // "New chat" replaces history; an answer still streaming then belongs to the old one
      markLast();
      saveConversation();
    }
  };

  try {
    const body = {
      model: await pickedModel(),
      messages: systemMessages().concat(turns.map(apiMessage)),
      stream: true,
      stream_options: { include_usage: true },
      ...sampling(),
    };
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    await readEvents(res, onData);
    finish("done");
  } catch (e) {
    if (e.name === "AbortError") {
      finish("stopped");
    } else {
      controller.abort();
      turns.splice(turns.indexOf(userTurn), 1);
      userTurn.el.classList.add("failed");
      userTurn.el.title = "Left out of the conversation: the request failed.";
      if (!ui.prompt.value && !attached.length) {
        ui.prompt.value = userTurn.content;
        attached = [...(userTurn.images || [])];
        showAttachments();
        autosize();
      }
      view.error(e.message || String(e));
      finish("error");
    }
  } finally {
    if (inflight === controller) {
      inflight = null;
      setBusy(false);
    }
  }
}

function send() {
  const prompt = ui.prompt.value;
  if ((!prompt.trim() && !attached.length) || inflight) return;
  ui.prompt.value = "";
  const userTurn = { role: "user", content: prompt };
  if (attached.length) userTurn.images = attached;
  attached = [];
  showAttachments();
  autosize();
  history.push(userTurn);
  addUserMessage(userTurn);
  answer(history, userTurn, addAssistantMessage());
}

// Asks the last message again; the new answer takes the old one's place.
function regenerate() {
  if (inflight || !history.length || history[history.length - 1].role !== "assistant") return;
  const old = history.pop();
  answer(history, history[history.length - 1], addAssistantMessage(old.el));
}

// Edits a user message in place (Enter sends, Esc cancels); sending it drops the answer and asks again.
function editMessage(turn) {
  if (inflight) return;
  const content = turn.el.querySelector(".content");
  const box = element("textarea", "edit-box");
  box.value = turn.content;
  box.setAttribute("aria-label", "Edit message");
  const editor = element("div", "editor");
  const close = () => {
    turn.el.classList.remove("editing");
    editor.replaceWith(content);
  };
  const submit = () => {
    if ((!box.value.trim() && !turn.images) || inflight) return;
    close();
    turn.content = content.textContent = box.value;
    const dropped = history.splice(history.indexOf(turn) + 1);
    answer(history, turn, addAssistantMessage(dropped.length ? dropped[0].el : null));
  };
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    } else if (e.key === "Escape") {
      close();
    }
  });
  const buttons = element("div", "tools");
  buttons.append(tool("Cancel", "Keep the message as it was (Esc)", close), tool("Send", "Ask again (Enter)", submit, "resend"));
  editor.append(box, buttons);
  turn.el.classList.add("editing");
  content.replaceWith(editor);
  box.focus();
}

// The conversation of the last visit, as it was left.
function restoreConversation() {
  let turns = [];
  try {
    turns = JSON.parse(storage("conversation") || "[]");
  } catch (e) {
    // An unreadable entry starts a new chat.
  }
  for (const turn of Array.isArray(turns) ? turns : []) {
    if (!turn || typeof turn.content !== "string") continue;
    const images = Array.isArray(turn.images) ? turn.images.filter((url) => typeof url === "string" && url.startsWith("data:")) : [];
    if (images.length) turn.images = images;
    else delete turn.images;
    if (turn.role === "user") {
      addUserMessage(turn);
    } else if (turn.role === "assistant") {
      const view = addAssistantMessage();
      if (turn.reasoning) view.reasoning(turn.reasoning);
      view.content(turn.content);
      view.finish(turn.state || "done", turn.tokens || 0, turn.meta || "");
      turn.el = view.el;
    } else {
      continue;
    }
    history.push(turn);
  }
  markLast();
  follow(true);
}

function systemMessages() {
  const system = ui.system.value.trim();
  return system ? [{ role: "system", content: system }] : [];
}

function stop() {
  if (inflight) inflight.abort();
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.app.dataset.busy = busy ? "true" : "false";
  if (!busy) updateSend();
}

function updateSend() {
  ui.send.disabled = !ui.prompt.value.trim() && !attached.length;
}

function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 220) + "px";
  updateSend();
}

function newChat() {
  stop();
  history = [];
  saveConversation();
  ui.messages.replaceChildren();
  ui.empty.hidden = false;
  ui.prompt.focus();
}

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.prompt.addEventListener("input", autosize);
ui.attach.addEventListener("click", () => ui.imageInput.click());
ui.imageInput.addEventListener("change", () => {
  attachFiles(ui.imageInput.files).catch((e) => {
    ui.attachments.append(element("div", "attach-error", "An image could not be read: " + e.message));
    ui.attachments.hidden = false;
  });
  ui.imageInput.value = "";
});
ui.settingsForm.addEventListener("submit", (e) => e.preventDefault());
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && inflight) stop();
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.settingsToggle.addEventListener("click", () => {
  const open = ui.app.classList.toggle("show-settings");
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
});

restoreConversation();
updateSend();
ui.prompt.focus();
model().catch(() => {});
