// The playground: chats with this server's own /v1/chat/completions, streamed,
// and draws the answer's boxes over the picture they refer to. Plain browser
// JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

// With "ground" on, the answer must be one reference and its box (structured output).
const GROUND_REGEX = "<ref>[^<]{1,40}</ref><box>\\(\\d{1,3},\\d{1,3}\\),\\(\\d{1,3},\\d{1,3}\\)</box>";
const KEY_STORAGE = "qwen-vl-serve.api-key";
const BOX_COLORS = ["#e4572e", "#2a62c9", "#17a34a", "#c026d3", "#d97706", "#0891b2"];

const $ = (id) => document.getElementById(id);

const state = {
  model: null,
  apiKey: localStorage.getItem(KEY_STORAGE) || "",
  history: [], // the messages of the finished turns, as sent
  historyImages: [], // their images in order of appearance: {url, width, height}
  pending: [], // images attached to the next turn
  controller: null, // the AbortController of the request in flight
};

class ApiError extends Error {}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  if (state.apiKey) result.Authorization = `Bearer ${state.apiKey}`;
  return result;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return new ApiError(`${response.status}: ${body.error.message}`);
  } catch {
    return new ApiError(`${response.status} ${response.statusText}`);
  }
}

function askForKey(message) {
  $("key-form").classList.add("needed");
  $("key-status").textContent = message;
  $("api-key").focus();
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (error) {
    $("model").textContent = `server unreachable (${error.message})`;
    return;
  }
  if (response.status === 401) {
    state.model = null;
    $("model").textContent = "needs an API key";
    askForKey(state.apiKey ? "This key was refused. Enter another one." : "This server needs an API key.");
    return;
  }
  if (!response.ok) {
    $("model").textContent = (await errorOf(response)).message;
    return;
  }
  state.model = (await response.json()).data[0].id;
  $("model").textContent = state.model;
  $("key-form").classList.remove("needed");
  $("key-status").textContent = state.apiKey ? "Key accepted." : "Needed only when the server has keys.";
}

// ---- images ---------------------------------------------------------------

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(reader.error);
    reader.onload = () => {
      const probe = new Image();
      probe.onload = () => resolve({ url: reader.result, width: probe.naturalWidth, height: probe.naturalHeight });
      probe.onerror = () => reject(new Error(`${file.name || "pasted image"} is not an image the browser can read`));
      probe.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    try {
      state.pending.push(await readImage(file));
    } catch (error) {
      alert(error.message);
    }
  }
  renderAttachments();
}

function thumbnail(image, caption) {
  const figure = element("figure");
  const img = element("img");
  img.src = image.url;
  img.alt = caption;
  figure.append(img, element("figcaption", "", caption));
  return figure;
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  list.className = "thumbs";
  state.pending.forEach((image, i) => {
    const item = element("li");
    const remove = element("button", "", "×");
    remove.type = "button";
    remove.title = "remove";
    remove.onclick = () => {
      state.pending.splice(i, 1);
      renderAttachments();
    };
    item.append(thumbnail(image, `Picture ${i + 1}`), remove);
    list.append(item);
  });
}

// ---- the transcript -------------------------------------------------------

function addUserTurn(text, images) {
  const turn = element("li", "turn user");
  turn.append(element("div", "role", "you"));
  if (images.length) {
    const thumbs = element("div", "thumbs");
    images.forEach((image, i) => thumbs.append(thumbnail(image, `Picture ${i + 1}`)));
    turn.append(thumbs);
  }
  if (text) turn.append(element("p", "text", text));
  $("transcript").append(turn);
}

function addAssistantTurn() {
  const node = element("li", "turn assistant");
  node.dataset.state = "streaming";
  const turn = { node, text: element("p", "text"), figures: element("div"), status: element("p", "status") };
  node.append(element("div", "role", state.model || "assistant"), turn.text, turn.figures, turn.status);
  $("transcript").append(node);
  return turn;
}

// Boxes come in pixels of the conversation's image `image_index`; they are
// placed in percent of that image's size, so they scale with the display.
function drawBoxes(turn, boxes, images) {
  const byImage = new Map();
  for (const box of boxes) {
    if (box.image_index === null || box.box_pixels === null || !images[box.image_index]) continue;
    if (!byImage.has(box.image_index)) byImage.set(box.image_index, []);
    byImage.get(box.image_index).push(box);
  }
  for (const [index, found] of byImage) {
    const image = images[index];
    const figure = element("figure", "grounded");
    const frame = element("div", "frame");
    const img = element("img");
    img.src = image.url;
    img.alt = `image ${index + 1} of the conversation`;
    frame.append(img);
    found.forEach((box, i) => {
      const [x1, y1, x2, y2] = box.box_pixels;
      const drawn = element("div", "box");
      drawn.dataset.imageIndex = index;
      drawn.style.setProperty("--color", BOX_COLORS[i % BOX_COLORS.length]);
      drawn.style.left = `${(100 * x1) / image.width}%`;
      drawn.style.top = `${(100 * y1) / image.height}%`;
      drawn.style.width = `${(100 * (x2 - x1)) / image.width}%`;
      drawn.style.height = `${(100 * (y2 - y1)) / image.height}%`;
      drawn.title = `${box.ref ?? box.kind} (${box.box_pixels.join(", ")})`;
      drawn.append(element("span", "label", box.ref ?? box.kind));
      frame.append(drawn);
    });
    figure.append(frame, element("figcaption", "", `image ${index + 1} of the conversation, ${found.length} box(es)`));
    turn.figures.append(figure);
  }
}

// ---- one request ----------------------------------------------------------

function samplingFields() {
  const fields = {};
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  if (number("temperature") !== undefined) fields.temperature = number("temperature");
  if (number("top-p") !== undefined) fields.top_p = number("top-p");
  if (number("max-tokens") !== undefined) fields.max_tokens = number("max-tokens");
  return fields;
}

// Reads the SSE stream into the turn; returns the answer's text.
async function stream(body, turn, images, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) {
      askForKey("This server needs an API key: enter it, then send again.");
      state.model = null;
    }
    throw error;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return text;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return text;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message);
        if (chunk.usage) turn.usage = chunk.usage;
        for (const choice of chunk.choices) {
          if (choice.delta.content) {
            text += choice.delta.content;
            turn.text.textContent = text;
          }
          if (choice.delta.boxes) drawBoxes(turn, choice.delta.boxes, images);
          if (choice.finish_reason) turn.node.dataset.finishReason = choice.finish_reason;
        }
      }
    }
  }
}

// "290 prompt tokens (258 cached) · 16 generated": the cached ones came from the prefix cache.
function usageText(usage) {
  if (!usage) return "";
  const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
  return `${usage.prompt_tokens} prompt tokens (${cached} cached) · ${usage.completion_tokens} generated`;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;
  const text = $("prompt").value.trim();
  const attached = state.pending;
  if (!text && !attached.length) return;
  if (!state.model) await loadModel();
  if (!state.model) return;

  const content = attached.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (text) content.push({ type: "text", text });
  const message = { role: "user", content };
  const images = [...state.historyImages, ...attached];
  const body = {
    model: state.model, messages: [...state.history, message], stream: true,
    stream_options: { include_usage: true }, ...samplingFields(),
  };
  if ($("ground").checked) body.structured_outputs = { regex: GROUND_REGEX };

  addUserTurn(text, attached);
  const turn = addAssistantTurn();
  turn.node.scrollIntoView({ block: "end" });
  $("prompt").value = "";
  state.pending = [];
  renderAttachments();
  state.controller = new AbortController();
  setBusy(true);

  let answer = "";
  try {
    answer = await stream(body, turn, images, state.controller.signal);
    turn.node.dataset.state = "done";
    const notes = [usageText(turn.usage)];
    if (turn.node.dataset.finishReason === "length") notes.unshift("stopped at max tokens");
    turn.status.textContent = notes.join(" · ");
  } catch (error) {
    if (error.name === "AbortError") {
      answer = turn.text.textContent;
      turn.node.dataset.state = "stopped";
      turn.status.textContent = "stopped";
    } else {
      turn.node.dataset.state = "error";
      turn.status.textContent = error.message;
      // Nothing was answered: give the question back to edit and send again.
      $("prompt").value = text;
      state.pending = attached;
      renderAttachments();
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  // A stopped answer stays in the history as far as it went; "New chat" may have cleared it meanwhile.
  if (turn.node.dataset.state !== "error" && turn.node.isConnected) {
    state.history.push(message, { role: "assistant", content: answer });
    state.historyImages.push(...attached);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.historyImages = [];
  $("transcript").replaceChildren();
}

function setUp() {
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("images").addEventListener("change", async (event) => {
    await attach([...event.target.files]);
    event.target.value = "";
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("paste", (event) => {
    const files = [...event.clipboardData.items].filter((item) => item.kind === "file").map((item) => item.getAsFile());
    if (files.some((file) => file.type.startsWith("image/"))) {
      event.preventDefault();
      attach(files);
    }
  });
  const composer = $("composer");
  composer.addEventListener("dragover", (event) => {
    event.preventDefault();
    composer.classList.add("dragging");
  });
  composer.addEventListener("dragleave", () => composer.classList.remove("dragging"));
  composer.addEventListener("drop", (event) => {
    event.preventDefault();
    composer.classList.remove("dragging");
    attach([...event.dataTransfer.files]);
  });
  $("api-key").value = state.apiKey;
  $("remember-key").checked = Boolean(localStorage.getItem(KEY_STORAGE));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.apiKey = $("api-key").value.trim();
    if ($("remember-key").checked && state.apiKey) localStorage.setItem(KEY_STORAGE, state.apiKey);
    else localStorage.removeItem(KEY_STORAGE);
    loadModel();
  });
  loadModel();
}

setUp();
