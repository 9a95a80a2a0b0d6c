"use strict";
/* Conversations and settings kept in this browser (localStorage), so that a reload or a closed
   tab loses nothing. One key holds the conversations:
     {version: 1, current: id | null, chats: [{id, title, updated, messages}]}
   a message being {role, content} as the API takes it; answers add the page's own fields
   (finish, stats, json), which are dropped before a request. A conversation is stored from its
   first message on: "New chat" only clears `current`. */

const store = (() => {
  const KEY = "mixtral-chats", SETTINGS = "mixtral-settings";
  let data = load();

  function load() {
    try {
      const d = JSON.parse(localStorage.getItem(KEY) || "null");
      if (d && d.version === 1 && Array.isArray(d.chats)) return d;
    } catch { /* unreadable: start afresh; the old value stays until the next save */ }
    return { version: 1, current: null, chats: [] };
  }

  /** Write everything; -> null, or why it could not be kept. */
  function save() {
    try {
      localStorage.setItem(KEY, JSON.stringify(data));
      return null;
    } catch {
      return "This browser's storage is full: delete old conversations to keep new ones.";
    }
  }

  const find = (id) => data.chats.find((c) => c.id === id) || null;
  const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

  return {
    /** Newest first. */
    list: () => [...data.chats].sort((a, b) => b.updated - a.updated),
    current: () => find(data.current),
    select(id) { data.current = find(id) ? id : null; return save(); },
    /** The conversation being shown, created (titled by its first message) if there is none. */
    ensure(firstText) {
      let chat = find(data.current);
      if (!chat) {
        const line = firstText.trim().split("\n")[0];
        chat = { id: newId(), title: line.length > 48 ? line.slice(0, 47) + "…" : line,
                 updated: Date.now(), messages: [] };
        data.chats.push(chat);
        data.current = chat.id;
      }
      return chat;
    },
    touch(chat) { chat.updated = Date.now(); return save(); },
    rename(id, title) { const c = find(id); if (c && title.trim()) c.title = title.trim(); return save(); },
    remove(id) {
      data.chats = data.chats.filter((c) => c.id !== id);
      if (data.current === id) data.current = null;
      return save();
    },
    /** Another tab changed the conversations: take its copy. */
    reload() { data = load(); },
    key: KEY,
    settings: () => { try { return JSON.parse(localStorage.getItem(SETTINGS) || "{}"); } catch { return {}; } },
    saveSettings: (s) => { try { localStorage.setItem(SETTINGS, JSON.stringify(s)); } catch { /* full */ } },
  };
})();
