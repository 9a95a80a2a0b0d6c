"use strict";
/* Model text -> elements, safely. marked parses the Markdown; DOMPurify then removes whatever
   could run or reach out (scripts, event handlers, javascript: URLs, forms, styles); only its
   output is ever assigned to innerHTML. highlight.js colours each code block (it escapes what
   it writes), and each block gets a bar with its language and a Copy button. */

const render = (() => {
  marked.setOptions({ gfm: true, breaks: true });  // models end lines with single newlines
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {  // a link from the model opens apart from the chat
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
  const POLICY = { FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
                   FORBID_ATTR: ["style"] };

  /** Fill `el` with `text` rendered: Markdown, or (for a JSON-mode answer) one JSON block. */
  function answer(el, text, json) {
    if (json) {
      el.replaceChildren(codeBlock(text, "json"));
      return;
    }
    el.innerHTML = DOMPurify.sanitize(marked.parse(text), POLICY);
    for (const code of el.querySelectorAll("pre > code")) {
      const language = (code.className.match(/language-([\w+#-]+)/) || [])[1] || "";
      code.parentElement.replaceWith(codeBlock(code.textContent, language));
    }
  }

  function codeBlock(source, language) {
    const box = document.createElement("div"), bar = document.createElement("div");
    const pre = document.createElement("pre"), code = document.createElement("code");
    box.className = "code"; bar.className = "bar";
    code.textContent = source;
    if (language && hljs.getLanguage(language)) {
      code.className = "language-" + language;
      hljs.highlightElement(code);
    }
    const name = document.createElement("span");
    name.textContent = language || "text";
    const button = copyButton(() => source, "Copy code");
    button.dataset.testid = "copy-code";
    bar.append(name, button);
    pre.append(code);
    box.append(bar, pre);
    return box;
  }

  /** A small button that puts `text()` on the clipboard and says whether that worked. */
  function copyButton(text, label = "Copy") {
    const button = document.createElement("button");
    button.type = "button"; button.className = "small"; button.textContent = label;
    button.addEventListener("click", async () => {
      try { await navigator.clipboard.writeText(text()); button.textContent = "Copied"; }
      catch { button.textContent = "Copy failed"; }
      setTimeout(() => (button.textContent = label), 1500);
    });
    return button;
  }

  return { answer, copyButton };
})();
