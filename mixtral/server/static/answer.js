"use strict";
/* Asking for answers: the request from the settings, `run` (one streamed answer into a new
   bubble, with its time to first token and tokens/s), the composer, and the page's start. */

/** The API request for `chat` as it stands (its last message is the user's). */
function request(chat) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat.messages.map(({ role, content }) => ({ role, content })));
  const body = {
    model: state.model || "mistral-small", messages, stream: true,
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value), safe_prompt: $("safe-prompt").checked,
  };
  if ($("seed").value !== "") body.random_seed = Number($("seed").value);
  const stops = $("stop-sequences").value.split("\n").filter((s) => s !== "")
    .map((s) => s.replaceAll("\\n", "\n"));
  if (stops.length) body.stop = stops;
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  return body;
}

/** The SSE events' data in a streamed response, as they arrive. */
async function* events(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {  // ": ping" keep-alives have no data line
        if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

/** Stream an answer to `chat` into a new bubble; keep it (stopped ones too) with its stats. */
async function run(chat) {
  showError("");
  if (!state.model) await loadModel();
  const body = request(chat);
  const message = { role: "assistant", content: "", json: !!body.response_format };
  const div = bubble(message, chat.messages.length);
  const out = div.querySelector(".text");
  delete div.dataset.finished;  // until the stream ends
  div.querySelector(".info").textContent = "generating…";
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  state.controller = new AbortController();
  setBusy(true);
  const start = performance.now();
  let first = null, usage = null, drawn = true;
  const draw = () => { if (!drawn) { render.answer(out, message.content, message.json); drawn = true; } };
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: state.controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error("Server error: " + chunk.error.message);
      const choice = chunk.choices[0];
      if (choice?.delta?.content) {
        first ??= performance.now();
        message.content += choice.delta.content;
        if (drawn) { drawn = false; requestAnimationFrame(draw); }  // one render a frame
      }
      if (choice?.finish_reason) message.finish = choice.finish_reason;
      if (chunk.usage) usage = chunk.usage;
    }
  } catch (e) {
    message.finish = e.name === "AbortError" ? "stopped" : "error";
    if (message.finish === "error") showError(e.message);
  } finally {
    setBusy(false);
    state.controller = null;
  }
  const end = performance.now();
  drawn = false; draw();
  message.stats = {
    ttft: first === null ? null : (first - start) / 1000,
    // decode speed: the tokens after the first over the time after it (the first is the prompt's)
    rate: usage && first !== null && usage.completion_tokens > 1 && end > first
      ? (usage.completion_tokens - 1) / ((end - first) / 1000) : null,
    tokens: usage ? usage.completion_tokens : null, prompt: usage ? usage.prompt_tokens : null,
  };
  describe(div, message);
  // screen readers hear the finished answer once, as shown (not each token as it streams)
  $("announcer").textContent = out.innerText || (message.finish === "error" ? "The answer failed." : "");
  if (message.content) {
    chat.messages.push(message);
    note(store.touch(chat));
  }
  if (message.content || chat.messages.at(-1)?.role === "user") addRegenerate(div, chat);
  listChats();
}

function send(text) {
  if (!text.trim() || state.controller) return;
  const chat = store.ensure(text);
  chat.messages.push({ role: "user", content: text });
  note(store.touch(chat));
  $("input").value = "";
  showChat();
  run(chat);
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send($("input").value); });
$("input").addEventListener("keydown", (e) => {
  // Enter that confirms an input method's candidate (Chinese, Japanese, Korean) is not a send
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller?.abort());
$("new-chat").addEventListener("click", () => {
  state.controller?.abort();
  note(store.select(null));
  showError("");
  showChat();
  drawer(false);
  $("input").focus();
});
window.addEventListener("storage", (e) => {  // another tab changed the conversations
  if (e.key === store.key && !state.controller) { store.reload(); showChat(); }
});

showChat();
loadModel();
