"use strict";
/* The chat page's behaviour: settings, theme and drawer; the conversation list; one message
   bubble per message; and `run`, which streams an answer from /v1/chat/completions (SSE) into
   the last bubble, timing it. Conversations live in `store` (store.js); model text becomes
   elements only through `render` (render.js). */

const $ = (id) => document.getElementById(id);
const state = { model: null, controller: null };
const FIELDS = { system: "value", temperature: "value", "top-p": "value", "max-tokens": "value",
                 seed: "value", "stop-sequences": "value", "safe-prompt": "checked",
                 "json-mode": "checked" };

// --- settings, API key, theme, drawer -------------------------------------------------------

const saved = store.settings();
for (const [id, prop] of Object.entries(FIELDS)) {
  if (id in saved) $(id)[prop] = saved[id];
  $(id).addEventListener("input", () => store.saveSettings(
    Object.fromEntries(Object.entries(FIELDS).map(([k, p]) => [k, $(k)[p]]))));
}
$("api-key").value = localStorage.getItem("mixtral-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("mixtral-api-key", $("api-key").value);
  loadModel();
});

const THEMES = { system: "◐ System", light: "☀ Light", dark: "☾ Dark" };
function setTheme(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  localStorage.setItem("mixtral-theme", theme);
  $("theme").textContent = THEMES[theme];
  $("theme").setAttribute("aria-label", `Theme: ${theme} (change)`);
}
setTheme(THEMES[localStorage.getItem("mixtral-theme")] ? localStorage.getItem("mixtral-theme") : "system");
$("theme").addEventListener("click", () => {
  const names = Object.keys(THEMES), now = localStorage.getItem("mixtral-theme") || "system";
  setTheme(names[(names.indexOf(now) + 1) % names.length]);
});

const narrow = window.matchMedia("(max-width: 800px)");
function drawer(open) {
  document.body.classList.toggle("drawer-open", open);
  $("backdrop").hidden = !open;
  $("menu").setAttribute("aria-expanded", String(open));
  $("sidebar").inert = narrow.matches && !open;  // a closed drawer is out of the tab order
  if (narrow.matches) (open ? $("close-drawer") : $("menu")).focus();
}
$("menu").addEventListener("click", () => drawer(true));
$("close-drawer").addEventListener("click", () => drawer(false));
$("backdrop").addEventListener("click", () => drawer(false));
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && document.body.classList.contains("drawer-open")) drawer(false);
});
narrow.addEventListener("change", () => drawer(false));
$("sidebar").inert = narrow.matches;

// --- the server: errors, the model card ------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h["Authorization"] = "Bearer " + $("api-key").value;
  return h;
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    const m = body.message ?? body.error?.message ?? body;
    return `Server error ${response.status}: ${typeof m === "string" ? m : JSON.stringify(m)}`;
  } catch { return `Server error ${response.status}`; }
}

const count = (n) => n >= 1e9 ? (n / 1e9).toFixed(1) + "B" : n >= 1e6 ? (n / 1e6).toFixed(1) + "M"
  : n.toLocaleString("en");

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { $("model").textContent = await errorText(r); return; }
    const card = (await r.json()).data[0];
    state.model = card.id;
    const facts = [["Name", card.id], ["About", card.description]];
    if (card.parameters) facts.push(["Parameters", `${count(card.parameters)} (${count(card.active_parameters)} per token)`]);
    if (card.dtype) facts.push(["Weights", card.quantization ? `${card.quantization} (compute ${card.dtype})` : `${card.dtype}, not quantized`]);
    facts.push(["Context", `${count(card.max_context_length)} tokens`]);
    const list = document.createElement("dl");
    for (const [term, value] of facts) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = term; dd.textContent = value;
      list.append(dt, dd);
    }
    $("model").replaceChildren(list);
  } catch { $("model").textContent = "server unreachable"; }
}

// --- the conversation list -------------------------------------------------------------------

function listChats() {
  const items = store.list().map((chat) => {
    const li = document.createElement("li");
    li.dataset.testid = "chat";
    li.setAttribute("aria-current", String(chat.id === store.current()?.id));
    const open = document.createElement("button");
    open.type = "button"; open.className = "open"; open.textContent = chat.title;
    open.addEventListener("click", () => { if (!state.controller) { note(store.select(chat.id)); showChat(); drawer(false); } });
    const rename = document.createElement("button");
    rename.type = "button"; rename.className = "small"; rename.textContent = "Rename";
    rename.setAttribute("aria-label", `Rename “${chat.title}”`);
    rename.addEventListener("click", () => renameChat(li, chat));
    const remove = document.createElement("button");
    remove.type = "button"; remove.className = "small"; remove.textContent = "Delete";
    remove.setAttribute("aria-label", `Delete “${chat.title}”`);
    remove.addEventListener("click", () => {
      if (!remove.classList.contains("confirm")) {  // a second click deletes: no lost chats by a slip
        remove.classList.add("confirm"); remove.textContent = "Delete?";
        setTimeout(() => { remove.classList.remove("confirm"); remove.textContent = "Delete"; }, 3000);
        return;
      }
      if (chat.id === store.current()?.id && state.controller) state.controller.abort();
      note(store.remove(chat.id));
      showChat();
    });
    li.append(open, rename, remove);
    return li;
  });
  if (!items.length) {
    const empty = document.createElement("li");
    empty.className = "empty"; empty.textContent = "No conversations yet";
    items.push(empty);
  }
  $("chats").replaceChildren(...items);
}

function renameChat(li, chat) {
  const input = document.createElement("input");
  input.type = "text"; input.value = chat.title; input.setAttribute("aria-label", "New name");
  let ended = false;  // Enter or Escape, then the blur of the removed field: act once
  const done = (keep) => {
    if (ended) return;
    ended = true;
    if (keep) note(store.rename(chat.id, input.value));
    showChat();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.isComposing) done(true);
    if (e.key === "Escape") { e.stopPropagation(); done(false); }
  });
  input.addEventListener("blur", () => done(true));
  li.replaceChildren(input);
  input.focus(); input.select();
}

function note(problem) { if (problem) showError(problem); }

// --- messages --------------------------------------------------------------------------------

/** The bubble of chat.messages[index]; an answer's is filled by `answer` (and by `run`). */
function bubble(message, index) {
  const div = document.createElement("div");
  div.className = "msg " + message.role;
  div.dataset.testid = message.role + "-message";
  const text = document.createElement("div"), meta = document.createElement("div");
  text.className = "text"; meta.className = "meta";
  div.append(text, meta);
  if (message.role === "user") {
    text.textContent = message.content;
    const edit = document.createElement("button");
    edit.type = "button"; edit.className = "small"; edit.textContent = "Edit";
    edit.dataset.testid = "edit";
    edit.addEventListener("click", () => editMessage(div, index));
    meta.append(edit);
  } else {
    const copy = render.copyButton(() => message.content);
    copy.dataset.testid = "copy";
    const info = document.createElement("span");
    info.className = "info";
    meta.append(copy, info);
    render.answer(text, message.content, message.json);
    describe(div, message);
  }
  return div;
}

function describe(div, message) {
  const s = message.stats, done = { length: "stopped at max tokens", stopped: "stopped",
                                     error: "failed" }[message.finish] || "done";
  div.querySelector(".info").textContent = [done,
    s && s.ttft != null && `${s.ttft.toFixed(2)} s to first token`,
    s && s.rate != null && `${s.rate.toFixed(1)} tokens/s`,
    s && s.tokens != null && `${s.prompt} prompt + ${s.tokens} completion tokens`,
  ].filter(Boolean).join(" · ");
  div.dataset.finished = message.finish === "stopped" || message.finish === "error" ? message.finish : "true";
}

function editMessage(div, index) {
  if (state.controller) return;
  const chat = store.current(), box = document.createElement("div");
  box.className = "edit";
  const area = document.createElement("textarea");
  area.value = chat.messages[index].content; area.setAttribute("aria-label", "Edit message");
  area.dataset.testid = "edit-input";
  const meta = document.createElement("div"), save = document.createElement("button"),
    cancel = document.createElement("button");
  meta.className = "meta";
  save.type = "button"; save.className = "primary small"; save.textContent = "Send";
  save.dataset.testid = "edit-send";
  cancel.type = "button"; cancel.className = "small"; cancel.textContent = "Cancel";
  save.addEventListener("click", () => {
    if (!area.value.trim()) return;
    chat.messages.splice(index, chat.messages.length - index, { role: "user", content: area.value });
    showChat();
    run(chat);
  });
  cancel.addEventListener("click", showChat);
  meta.append(cancel, save);
  box.append(area, meta);
  div.replaceChildren(box);
  area.focus();
}

/** Draw the current conversation, its title and the list; a Regenerate on the last answer. */
function showChat() {
  const chat = store.current();
  $("chat-title").textContent = chat ? chat.title : "New chat";
  $("messages").replaceChildren(...(chat ? chat.messages.map(bubble) : []));
  const last = $("messages").lastElementChild;
  if (last && last.classList.contains("assistant")) addRegenerate(last, chat);
  if (last) last.scrollIntoView({ block: "end" });
  listChats();
}

function addRegenerate(div, chat) {
  const again = document.createElement("button");
  again.type = "button"; again.className = "small"; again.textContent = "Regenerate";
  again.dataset.testid = "regenerate";
  again.addEventListener("click", () => {
    if (state.controller) return;
    if (chat.messages.at(-1)?.role === "assistant") chat.messages.pop();
    showChat();
    run(chat);
  });
  div.querySelector(".meta").prepend(again);
}
