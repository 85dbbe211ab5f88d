// Hearth chat page. Plain JavaScript, no build step, no dependencies.
//
// It speaks only the client protocol of docs/protocol.md: the HTTP API under /v1/ and
// the WebSocket session at /v1/ws.
//
// Layout of this file:
//   1. small helpers (DOM, storage, time, words for errors)
//   2. state, kept per device in localStorage: session, unread counts, seen event ids,
//      unacknowledged sends (the outbox) and the idempotency key counter
//   3. the HTTP API
//   4. the WebSocket session: auth, ready, sync backlog, live events, acks, heartbeat,
//      cursor, reconnect with backoff
//   5. conversations: list, history paging, live merge, rendering
//   6. sending: pending, sent, failed and retry with the same key
//   7. presence, dialogs, composer and navigation
//   8. notifications: Web Push through the service worker sw.js
//   then sign-in and start-up
'use strict';

// ---------------------------------------------------------------- 1. helpers

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  if (props) {
    for (const [k, v] of Object.entries(props)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k.startsWith('data-') || k.startsWith('aria-') || k === 'role') e.setAttribute(k, v);
      else e[k] = v;
    }
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

// Per-device storage. Everything lives under one prefix; a logout clears it.
const PREFIX = 'hearth.';
const store = {
  get(k, d) {
    try {
      const v = localStorage.getItem(PREFIX + k);
      return v === null ? d : JSON.parse(v);
    } catch { return d; }
  },
  set(k, v) {
    try { localStorage.setItem(PREFIX + k, JSON.stringify(v)); } catch { /* full or disabled */ }
  },
  clear() {
    for (let i = localStorage.length - 1; i >= 0; i--) {
      const k = localStorage.key(i);
      if (k && k.startsWith(PREFIX)) localStorage.removeItem(k);
    }
  },
};

function randomId(n) {
  const abc = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
  const bytes = crypto.getRandomValues(new Uint8Array(n));
  let s = '';
  for (const b of bytes) s += abc[b % abc.length];
  return s;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dateFmt = new Intl.DateTimeFormat(undefined, { day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit' });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });
const relFmt = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });

function shortTime(ts) {
  const d = new Date(ts);
  return d.toDateString() === new Date().toDateString() ? timeFmt.format(d) : dateFmt.format(d);
}

function ago(ts) {
  const s = Math.round((ts - Date.now()) / 1000);
  if (s > -60) return 'just now';
  const m = Math.round(s / 60);
  if (m > -60) return relFmt.format(m, 'minute');
  const h = Math.round(m / 60);
  if (h > -48) return relFmt.format(h, 'hour');
  return relFmt.format(Math.round(h / 24), 'day');
}

// Words a person understands, by protocol error code.
const WORDS = {
  network: 'Cannot reach the server. Check your connection and try again.',
  bad_request: 'The server did not understand that request. Reloading the page may help.',
  bad_credentials: 'That user name and password do not match.',
  user_exists: 'That user name is already taken. Pick another one, or log in.',
  registration_closed: 'This server does not accept new accounts. Ask its administrator for one.',
  account_disabled: 'This account has been disabled. Ask the server administrator.',
  unauthorized: 'You have been signed out. Please log in again.',
  unknown_user: 'There is nobody with that address.',
  unknown_channel: 'That conversation does not exist any more.',
  not_member: 'You are not a member of this conversation.',
  not_channel_admin: 'Only an admin of the group can do that.',
  already_member: 'That person is already in the group.',
  group_full: 'The group is full.',
  direct_channel: 'A direct chat always has exactly two people. Create a group instead.',
  invalid_recipient: 'You cannot start a chat with yourself.',
  too_large: 'That message is too long.',
  rate_limited: 'You are sending very fast; trying again in a moment.',
  internal: 'The server had a problem. Please try again.',
  unsupported_version: 'This page is out of date. Reload it.',
  not_found: 'The server does not know that request. Reloading the page may help.',
};

function sentence(s) {
  s = String(s || '').trim();
  if (!s) return s;
  s = s[0].toUpperCase() + s.slice(1);
  return /[.!?]$/.test(s) ? s : s + '.';
}

// The server's `detail` is written for people; some codes are clearer with it.
function words(code, detail) {
  if ((code === 'invalid_field' || code === 'group_full') && detail) return sentence(detail);
  if (code === 'unknown_user' && detail && /federate/.test(detail)) return sentence(detail);
  return WORDS[code] || (detail ? sentence(detail) : 'Something went wrong (' + code + ').');
}

class ApiError extends Error {
  constructor(code, detail, status) {
    super(words(code, detail));
    this.code = code;
    this.status = status;
  }
}

// ---------------------------------------------------------------- 2. state

const S = {
  session: store.get('session', null), // {user, device, token}
  server: '',
  channels: new Map(), // id -> conversation (see conv())
  order: [], // channel ids, most recent activity first
  current: null,
  gone: new Set(), // channels we are not in any more
  fetching: new Map(), // channel id -> promise of its summary
  presence: new Map(), // user -> {status, last_active_at}
  outbox: new Map(), // key -> pending send
  unread: {},
  seen: [], // recent event ids counted for unread, oldest first
  seenSet: new Set(),
  freshDevice: false,
};

const SEEN_MAX = 2000;

function loadDeviceState() {
  S.unread = store.get('unread', {});
  S.seen = store.get('seen', []);
  S.seenSet = new Set(S.seen);
  S.outbox = new Map(store.get('outbox', []).map((o) => [o.key, o]));
  if (!store.get('keyPrefix', null)) store.set('keyPrefix', randomId(12));
}

function saveUnread() {
  if (S.seen.length > SEEN_MAX) {
    for (const id of S.seen.splice(0, S.seen.length - SEEN_MAX)) S.seenSet.delete(id);
  }
  store.set('unread', S.unread);
  store.set('seen', S.seen);
}

function saveOutbox() {
  store.set('outbox', [...S.outbox.values()].map(({ key, channel, body, created, state, error, retriable }) =>
    ({ key, channel, body, created, state: state === 'failed' ? 'failed' : 'waiting', error, retriable })));
}

// Idempotency keys: unique per user forever (random per-device prefix + counter).
function newKey() {
  const n = store.get('keyCounter', 0) + 1;
  store.set('keyCounter', n);
  return store.get('keyPrefix', 'x') + '-' + n;
}

const me = () => (S.session ? S.session.user : '');

// A user's name for display: the local part on this server, the full address elsewhere.
function who(user) {
  if (!user) return '';
  const [local, server] = user.split('@');
  return server === S.server ? local : user;
}

// ---------------------------------------------------------------- 3. HTTP API

async function api(method, path, body) {
  const headers = {};
  if (S.session) headers.Authorization = 'Bearer ' + S.session.token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError('network');
  }
  if (res.status === 204) return null;
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  if (!res.ok) {
    const code = json && json.code ? json.code : 'http_' + res.status;
    const err = new ApiError(code, json && json.code ? json.detail : 'the server answered ' + res.status, res.status);
    if (code === 'unauthorized' || code === 'account_disabled') {
      if (S.session && !path.startsWith('/v1/login') && !path.startsWith('/v1/register')) signedOut(err.message);
    }
    throw err;
  }
  return json;
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------- 4. WebSocket session

const W = {
  ws: null,
  state: 'offline', // offline | connecting | syncing | online
  attempt: 0,
  timer: null, // reconnect timer
  beat: null, // heartbeat interval
  readyTimer: null,
  cursorTimer: null,
  lastPos: 0, // highest stream position processed
  sentPos: 0, // highest position sent as cursor
  stopped: true,
  retryAt: 0,
};

function setConn(state, text) {
  W.state = state;
  document.body.dataset.conn = state;
  const banner = $('banner');
  if (state === 'online') {
    banner.hidden = true;
  } else {
    banner.hidden = false;
    $('banner-text').textContent = text || (state === 'connecting' ? 'Connecting…' : 'Offline.');
    $('reconnect-now').hidden = state !== 'offline';
  }
}

function connect() {
  clearTimeout(W.timer);
  if (!S.session) return;
  W.stopped = false;
  dropSocket();
  setConn('connecting', W.attempt ? 'Reconnecting…' : 'Connecting…');
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/v1/ws';
  let ws;
  try { ws = new WebSocket(url); } catch { scheduleReconnect(); return; }
  W.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', v: 1, token: S.session.token }));
  ws.onmessage = (m) => {
    let f;
    try { f = JSON.parse(m.data); } catch { return; }
    onFrame(f);
  };
  ws.onclose = (e) => { if (W.ws === ws) onClosed(e.code); };
  // No `ready` within 15 s: the connection is useless; start again.
  W.readyTimer = setTimeout(() => { if (W.ws === ws && W.state === 'connecting') { dropSocket(); scheduleReconnect(); } }, 15000);
}

// Forgets the current socket at once (its late events are ignored) and closes it.
function dropSocket() {
  clearInterval(W.beat);
  clearTimeout(W.readyTimer);
  clearTimeout(W.cursorTimer);
  const ws = W.ws;
  W.ws = null;
  if (ws) {
    ws.onopen = ws.onmessage = ws.onclose = null;
    try { ws.close(1000); } catch { /* already closed */ }
  }
  for (const o of S.outbox.values()) if (o.state === 'sending') setOutState(o, 'waiting');
}

function onClosed(code) {
  dropSocket();
  if (code === 4001 || code === 4006) return signedOut(code === 4006
    ? 'This browser was logged out. Please log in again.'
    : 'Your session is no longer valid. Please log in again.');
  if (code === 4002) { W.stopped = true; return setConn('offline', WORDS.unsupported_version); }
  scheduleReconnect();
}

function scheduleReconnect() {
  if (W.stopped || !S.session) return;
  // 0.5 s, 1 s, 2 s, … up to 30 s, with jitter so a restarted server is not stampeded.
  const base = Math.min(30000, 500 * 2 ** Math.min(W.attempt, 6));
  const delay = Math.round(base * (0.75 + Math.random() * 0.5));
  W.attempt++;
  W.retryAt = Date.now() + delay;
  clearTimeout(W.timer);
  W.timer = setTimeout(connect, delay);
  countdown();
}

function countdown() {
  if (W.state === 'online' || W.state === 'connecting' && W.ws) return;
  const s = Math.max(0, Math.ceil((W.retryAt - Date.now()) / 1000));
  setConn('offline', navigator.onLine === false
    ? 'You are offline. Messages you write will be sent when the connection is back.'
    : 'Connection lost. Reconnecting in ' + s + ' s…');
  if (s > 0) setTimeout(countdown, 1000);
}

function wsSend(frame) {
  if (!W.ws || W.ws.readyState !== WebSocket.OPEN) return false;
  try { W.ws.send(JSON.stringify(frame)); return true; } catch { return false; }
}

function onFrame(f) {
  switch (f.type) {
    case 'ready': return onReady(f);
    case 'sync': return onSync(f);
    case 'event': return onEvent(f.event, true);
    case 'ack': return onAck(f);
    case 'error': return onWsError(f);
    case 'presence': return setPresence(f);
    default: return undefined; // unknown frame types are ignored
  }
}

function onReady(f) {
  clearTimeout(W.readyTimer);
  if (f.user !== me()) { signedOut('This browser was signed in as someone else. Please log in again.'); return; }
  W.attempt = 0;
  W.lastPos = W.sentPos = f.cursor;
  S.freshDevice = f.cursor === 0 && !store.get('synced', false);
  setConn('syncing', 'Catching up…');
  const every = Math.max(1000, Math.floor(f.heartbeat_timeout_ms / 3));
  W.beat = setInterval(() => { wsSend({ type: 'heartbeat' }); ackCursor(); }, every);
  // Unacknowledged sends go again with the same keys: at most one copy is stored.
  // (Sends the server refused stay failed until the person retries or discards them.)
  for (const o of S.outbox.values()) if (o.state === 'waiting' || (o.state === 'failed' && o.retriable)) transmit(o);
}

function onSync(f) {
  for (const ev of f.events) onEvent(ev, false);
  saveUnread();
  renderListSoon();
  ackCursor();
  if (!f.more) {
    store.set('synced', true);
    S.freshDevice = false;
    setConn('online');
    // Things we could not hear while away: channel summaries and presence.
    if (!S.server) start(true); else refreshChannels();
    refreshPresence();
  }
}

function ackCursor() {
  clearTimeout(W.cursorTimer);
  if (W.lastPos > W.sentPos && wsSend({ type: 'cursor', pos: W.lastPos })) W.sentPos = W.lastPos;
}

// A cursor shortly after live events, batched (cursor frames count against the rate limit).
function soonAckCursor() {
  clearTimeout(W.cursorTimer);
  W.cursorTimer = setTimeout(ackCursor, 1000);
}

function onWsError(f) {
  if (f.key && S.outbox.has(f.key)) return onSendError(S.outbox.get(f.key), f.code, f.message);
  if (f.code === 'unauthorized' || f.code === 'account_disabled') return undefined; // a close follows
  return undefined; // other errors answer frames this page does not retry (cursor, heartbeat)
}

// ---------------------------------------------------------------- 5. conversations

// Channel order: (ts, origin, seq); events without an id yet (pending sends) last.
function cmp(a, b) {
  return (a.ts - b.ts) || (a.origin < b.origin ? -1 : a.origin > b.origin ? 1 : 0) || (a.seq - b.seq);
}

function conv(id) {
  let c = S.channels.get(id);
  if (!c) {
    c = { id, summary: null, events: null, sorted: [], next: undefined, loading: false, members: null };
    S.channels.set(id, c);
  }
  return c;
}

function title(c) {
  if (!c.summary) return 'Conversation';
  return c.summary.kind === 'direct' ? who(c.summary.name) : c.summary.name;
}

function lastTs(c) {
  return c.summary && c.summary.last_event ? c.summary.last_event.ts : (c.created || 0);
}

function setSummary(s) {
  const c = conv(s.id);
  S.gone.delete(s.id);
  if (!c.created) c.created = Date.now();
  const old = c.summary && c.summary.last_event;
  c.summary = s;
  c.summaryAt = Date.now();
  // Keep a newer last event seen live than the one the summary had.
  if (old && (!s.last_event || cmp(old, s.last_event) > 0)) s.last_event = old;
  return c;
}

async function refreshChannels() {
  const asked = Date.now();
  try {
    const { channels } = await api('GET', '/v1/channels');
    const ids = new Set(channels.map((s) => s.id));
    for (const s of channels) setSummary(s);
    for (const [id, c] of S.channels) {
      // Gone from the list, unless we learnt of it after asking.
      if (!ids.has(id) && c.summary && c.summaryAt < asked) forget(id);
    }
    renderList();
    if (S.current) renderHeader();
  } catch { /* shown by the connection banner or a sign-out */ }
}

// The summary of a channel we heard of in the stream but do not know yet.
function fetchChannel(id) {
  if (S.fetching.has(id)) return S.fetching.get(id);
  const p = api('GET', '/v1/channels/' + enc(id)).then((s) => {
    if (S.gone.has(id)) return null; // we left or were removed while asking
    setSummary(s);
    renderList();
    if (S.current === id) renderHeader();
    return s;
  }, (e) => {
    if (e.code === 'not_member' || e.code === 'unknown_channel') forget(id);
    return null;
  }).finally(() => S.fetching.delete(id));
  S.fetching.set(id, p);
  return p;
}

function forget(id) {
  S.gone.add(id);
  S.channels.delete(id);
  delete S.unread[id];
  saveUnread();
  renderList();
  if (S.current === id) {
    S.current = null;
    renderConversation();
    showConvError('You are no longer a member of that conversation.');
  }
}

// One event from the stream (backlog or live); deduplicated by id.
function onEvent(ev, live) {
  if (typeof ev.pos === 'number' && ev.pos > W.lastPos) W.lastPos = ev.pos;
  if (live) soonAckCursor();
  if (S.gone.has(ev.channel) && !(ev.kind === 'membership' && ev.content.user === me() && ev.content.action === 'add')) return;
  const c = conv(ev.channel);
  const known = c.summary;
  if (!known) fetchChannel(ev.channel);

  if (ev.kind === 'membership') onMembership(c, ev);
  if (known && (!known.last_event || cmp(ev, known.last_event) > 0)) known.last_event = ev;
  if (!known && !c.created) c.created = ev.ts;

  // Unread: messages from others, not on screen, counted once per event id.
  const visible = S.current === ev.channel && document.visibilityState === 'visible';
  if (ev.kind === 'message' && ev.sender !== me() && !visible && !S.freshDevice && !S.seenSet.has(ev.id)) {
    S.unread[ev.channel] = (S.unread[ev.channel] || 0) + 1;
    S.seen.push(ev.id);
    S.seenSet.add(ev.id);
    if (live) saveUnread();
  }

  if (c.events) addEvents(c, [ev]);
  if (live || S.current === ev.channel) renderListSoon();
}

function onMembership(c, ev) {
  const s = c.summary;
  const mine = ev.content.user === me();
  if (s && ev.content.version <= s.version) return; // old news (e.g. the backlog of a new device)
  if (mine && (ev.content.action === 'leave' || ev.content.action === 'remove')) {
    forget(c.id);
    return;
  }
  if (mine && ev.content.action === 'add') S.gone.delete(c.id); // added (back)
  // Newer membership than we know: refresh the summary, and the member list if shown.
  if (s) S.fetching.delete(c.id);
  fetchChannel(c.id).then(() => {
    if (S.current === c.id) loadMembers(c);
  });
}

// Merges events into a loaded conversation, and shows them if it is on screen.
function addEvents(c, events) {
  let changed = false;
  for (const ev of events) {
    const had = c.events.get(ev.id);
    if (had && !had.stub) continue;
    const e = { ...ev };
    delete e.pos;
    c.events.set(ev.id, e);
    if (had) c.sorted.splice(c.sorted.indexOf(had), 1);
    // Insert in channel order (binary search; live events usually go last).
    let lo = 0;
    let hi = c.sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cmp(c.sorted[mid], e) <= 0) lo = mid + 1; else hi = mid;
    }
    c.sorted.splice(lo, 0, e);
    changed = true;
  }
  if (changed && S.current === c.id) renderMessages(c);
}

let listTimer = 0;
function renderListSoon() {
  if (!listTimer) listTimer = requestAnimationFrame(() => { listTimer = 0; renderList(); });
}

function preview(ev) {
  if (!ev) return '';
  if (ev.kind === 'message') return (ev.sender === me() ? 'You: ' : '') + ev.content.body;
  return membershipText(ev);
}

function membershipText(ev) {
  const by = ev.sender === me() ? 'You' : who(ev.sender);
  const u = ev.content.user === me() ? 'you' : who(ev.content.user);
  switch (ev.content.action) {
    case 'create': return by + ' created the group “' + (ev.content.name || '') + '”';
    case 'add': return by + ' added ' + u;
    case 'remove': return by + ' removed ' + u;
    case 'leave': return (ev.content.user === me() ? 'You' : who(ev.content.user)) + ' left';
    default: return 'Membership changed';
  }
}

// List items by channel id, updated in place (a click never lands on a replaced node).
const listItems = new Map();

function listItem(id) {
  let it = listItems.get(id);
  if (!it) {
    it = {
      dot: el('span', { 'aria-hidden': 'true' }),
      name: el('span', { class: 'name' }),
      time: el('time', { class: 'muted' }),
      preview: el('span', { class: 'preview muted' }),
      badge: el('span', { class: 'badge', 'aria-hidden': 'true' }),
    };
    it.btn = el('button', { type: 'button', 'data-channel': id, onclick: () => openConversation(id) },
      it.dot, it.name, it.time, it.preview, it.badge);
    it.li = el('li', null, it.btn);
    listItems.set(id, it);
  }
  return it;
}

function renderList() {
  const list = $('conv-list');
  const convs = [...S.channels.values()].filter((c) => c.summary);
  convs.sort((a, b) => lastTs(b) - lastTs(a) || (a.id < b.id ? -1 : 1));
  S.order = convs.map((c) => c.id);
  const focusId = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.channel : null;
  const wanted = convs.map((c) => {
    const s = c.summary;
    const n = S.unread[c.id] || 0;
    const other = s.kind === 'direct' ? s.name : null;
    const p = other ? S.presence.get(other) : null;
    const it = listItem(c.id);
    it.btn.className = 'conv' + (c.id === S.current ? ' current' : '');
    it.btn.setAttribute('aria-label', title(c) + (n ? ', ' + n + ' unread' : '') + (p ? ', ' + p.status : ''));
    if (c.id === S.current) it.btn.setAttribute('aria-current', 'true'); else it.btn.removeAttribute('aria-current');
    it.dot.className = 'dot ' + (p ? p.status : s.kind);
    it.name.textContent = title(c);
    it.time.textContent = s.last_event ? shortTime(s.last_event.ts) : '';
    it.preview.textContent = preview(s.last_event);
    it.badge.hidden = !n;
    it.badge.textContent = String(n);
    it.badge.dataset.unread = String(n);
    return it.li;
  });
  const keep = new Set(wanted);
  for (const [id, it] of listItems) {
    if (!keep.has(it.li)) { it.li.remove(); listItems.delete(id); }
  }
  let cursor = list.firstChild;
  for (const li of wanted) {
    if (li === cursor) cursor = cursor.nextSibling;
    else list.insertBefore(li, cursor);
  }
  $('conv-empty').hidden = wanted.length > 0;
  // Moving a focused item drops its focus: give it back.
  if (focusId && document.activeElement !== (listItems.get(focusId) || {}).btn && listItems.has(focusId)
      && (!document.activeElement || document.activeElement === document.body)) {
    listItems.get(focusId).btn.focus();
  }
  const total = Object.values(S.unread).reduce((a, b) => a + b, 0);
  document.title = (total ? '(' + total + ') ' : '') + 'Hearth';
}

async function openConversation(id) {
  const c = S.channels.get(id);
  if (!c) return;
  S.current = id;
  c.justOpened = true;
  document.body.classList.add('show-conv');
  if (S.unread[id]) { delete S.unread[id]; saveUnread(); }
  showConvError('');
  renderConversation();
  renderList();
  $('compose').focus();
  if (!c.events) {
    c.events = new Map();
    c.sorted = [];
    c.next = undefined;
    c.justOpened = true;
    await loadOlder(c);
  }
  if (c.summary && c.summary.kind === 'group') loadMembers(c);
  refreshPresence();
}

// Loads one page of history older than what is shown (the newest page first).
async function loadOlder(c) {
  if (c.loading || c.next === null) return;
  c.loading = true;
  const box = $('messages');
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    const q = '?limit=50' + (c.next ? '&before=' + enc(c.next) : '');
    const page = await api('GET', '/v1/channels/' + enc(c.id) + '/messages' + q);
    c.next = page.next || null;
    c.loading = false;
    addEvents(c, page.events);
    if (S.current === c.id) {
      renderMessages(c);
      // Keep the reader's place when older messages appear above.
      box.scrollTop = box.scrollHeight - fromBottom;
    }
  } catch (e) {
    c.loading = false;
    if (S.current === c.id) showConvError(e.message);
    if (e.code === 'not_member' || e.code === 'unknown_channel') forget(c.id);
  }
}

function showConvError(text) {
  const p = $('conv-error');
  p.textContent = text;
  p.hidden = !text;
}

function renderConversation() {
  const c = S.current ? S.channels.get(S.current) : null;
  $('conv-placeholder').hidden = !!c;
  $('conv-header').hidden = $('messages').hidden = $('composer').hidden = !c;
  if (!c) {
    document.body.classList.remove('show-conv');
    $('msg-list').replaceChildren();
    return;
  }
  renderHeader();
  $('msg-list').replaceChildren();
  elements.clear();
  renderMessages(c);
}

function renderHeader() {
  const c = S.channels.get(S.current);
  if (!c) return;
  $('conv-title').textContent = title(c);
  const s = c.summary;
  let sub = '';
  if (s && s.kind === 'direct') {
    sub = presenceText(S.presence.get(s.name)) + (s.name.split('@')[1] !== S.server ? ' · ' + s.name : '');
  } else if (s) {
    const online = c.members ? c.members.members.filter((m) => m.user !== me() && (S.presence.get(m.user) || {}).status === 'online').length : 0;
    sub = s.member_count + ' members' + (online ? ', ' + online + ' online' : '');
  }
  $('conv-sub').textContent = sub;
  $('members-btn').hidden = !s;
  $('members-btn').textContent = s && s.kind === 'group' ? 'Members' : 'Details';
}

// DOM elements of the open conversation: event id or send key -> <li>.
const elements = new Map();

function messageItem(e, pending) {
  if (e.kind === 'membership') {
    return el('li', { class: 'sys', 'data-id': e.id }, el('span', { text: membershipText(e) }),
      ' ', el('time', { dateTime: new Date(e.ts).toISOString(), title: fullFmt.format(e.ts), text: shortTime(e.ts) }));
  }
  const mine = e.sender === me();
  const li = el('li', { class: 'msg ' + (mine ? 'mine' : 'theirs') });
  li.append(
    el('div', { class: 'meta' },
      el('span', { class: 'sender', text: mine ? 'You' : who(e.sender) }), ' ',
      el('time', { dateTime: new Date(e.ts).toISOString(), title: fullFmt.format(e.ts), text: shortTime(e.ts) })),
    el('div', { class: 'body', text: e.content.body }));
  updateItem(li, e, pending);
  return li;
}

// Sets the delivery state of one of our own messages on its element.
function updateItem(li, e, pending) {
  li.dataset.id = e.id || '';
  let state = '';
  if (pending) state = pending.state;
  else if (e.sender === me()) state = 'sent';
  li.dataset.state = state;
  li.classList.toggle('pending', state === 'sending' || state === 'waiting');
  li.classList.toggle('failed', state === 'failed');
  let st = li.querySelector('.state');
  if (!state) { if (st) st.remove(); return; }
  if (!st) { st = el('div', { class: 'state' }); li.append(st); }
  const text = {
    sending: 'Sending…',
    waiting: 'Waiting for the connection…',
    sent: 'Sent ✓',
    failed: 'Not sent: ' + (pending && pending.error ? pending.error : 'no answer from the server.'),
  }[state];
  st.replaceChildren(el('span', { text }));
  if (state === 'failed') {
    st.setAttribute('role', 'alert');
    st.append(' ',
      el('button', { type: 'button', class: 'retry', text: 'Retry', onclick: () => retry(pending.key) }),
      ' ',
      el('button', { type: 'button', class: 'quiet discard', text: 'Discard', onclick: () => discard(pending.key) }));
  } else {
    st.removeAttribute('role');
  }
}

function renderMessages(c) {
  const list = $('msg-list');
  const box = $('messages');
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  // Events in channel order, then our sends not stored yet, oldest first.
  const pending = [...S.outbox.values()].filter((o) => o.channel === c.id && !o.eventId)
    .sort((a, b) => a.created - b.created);
  // Our own event can arrive before its ack: until the ack, the pending send with the
  // same body stands for it, so the message is never shown twice.
  const awaiting = pending.filter((o) => o.state !== 'failed' || o.retriable).map((o) => o.body);
  const wanted = [];
  for (const e of c.sorted) {
    let li = elements.get(e.id);
    if (!li && !e.stub && e.sender === me() && e.kind === 'message') {
      const i = awaiting.indexOf(e.content.body);
      if (i >= 0) { awaiting.splice(i, 1); continue; }
    }
    if (!li) {
      // An ack turned a pending send into an event: reuse its element.
      const key = e.key && elements.get('key:' + e.key);
      if (key) { li = key; elements.delete('key:' + e.key); updateItem(li, e, null); }
      else li = messageItem(e, null);
      elements.set(e.id, li);
    }
    wanted.push(li);
  }
  for (const o of pending) {
    let li = elements.get('key:' + o.key);
    const e = { kind: 'message', sender: me(), ts: o.created, content: { body: o.body } };
    if (!li) { li = messageItem(e, o); li.dataset.key = o.key; elements.set('key:' + o.key, li); }
    else updateItem(li, e, o);
    wanted.push(li);
  }
  // Make the list exactly `wanted`, moving as few nodes as possible.
  const keep = new Set(wanted);
  for (const child of [...list.children]) {
    if (!keep.has(child)) {
      child.remove();
      for (const [k, v] of elements) if (v === child) elements.delete(k);
    }
  }
  let cursor = list.firstChild;
  for (const li of wanted) {
    if (li === cursor) cursor = cursor.nextSibling;
    else list.insertBefore(li, cursor);
  }
  $('older-btn').hidden = c.next === null || c.next === undefined;
  $('history-start').hidden = c.next !== null;
  if (atBottom || c.justOpened) {
    box.scrollTop = box.scrollHeight;
    c.justOpened = false;
  }
}

// ---------------------------------------------------------------- 6. sending

function sendMessage(body) {
  const c = S.channels.get(S.current);
  if (!c || !body.trim()) return;
  if (new TextEncoder().encode(body).length > 16384) {
    showConvError('That message is too long (16 KB at most). Split it into parts.');
    return;
  }
  showConvError('');
  const o = { key: newKey(), channel: c.id, body, created: Date.now(), state: 'waiting' };
  S.outbox.set(o.key, o);
  saveOutbox();
  transmit(o);
  if (!c.events) { c.events = new Map(); c.sorted = []; }
  c.justOpened = true; // scroll to our own message
  renderMessages(c);
}

function transmit(o) {
  clearTimeout(o.timer);
  o.error = undefined;
  const ok = W.state !== 'connecting' && wsSend({ type: 'send', key: o.key, channel: o.channel, body: o.body });
  setOutState(o, ok ? 'sending' : 'waiting');
  if (ok) {
    // No answer in 10 s: the connection is probably dead. Show the send as failed
    // (the person can retry it with the same key) and start a fresh connection.
    o.timer = setTimeout(() => {
      if (S.outbox.get(o.key) !== o || o.state !== 'sending') return;
      o.error = 'no answer from the server. It will be sent again when the connection is back.';
      o.retriable = true;
      setOutState(o, 'failed');
      saveOutbox();
      dropSocket();
      scheduleReconnect();
    }, 10000);
  }
}

function setOutState(o, state) {
  o.state = state;
  const li = elements.get('key:' + o.key);
  if (li) updateItem(li, { id: '', sender: me() }, o);
}

function onAck(f) {
  const o = S.outbox.get(f.key);
  if (!o) return;
  clearTimeout(o.timer);
  S.outbox.delete(f.key);
  saveOutbox();
  o.eventId = f.event_id;
  const c = conv(f.channel);
  if (c.events) {
    // Until our own event arrives in the stream, a stub holds its place in order.
    if (!c.events.has(f.event_id)) {
      const stub = { id: f.event_id, key: f.key, stub: true, channel: f.channel, sender: me(), origin: S.server,
        seq: Number.MAX_SAFE_INTEGER, ts: f.ts, kind: 'message', content: { body: o.body } };
      addEvents(c, [stub]);
    } else {
      const li = elements.get('key:' + f.key);
      if (li) { li.remove(); elements.delete('key:' + f.key); }
    }
    if (S.current === c.id) renderMessages(c);
  }
}

function onSendError(o, code, message) {
  clearTimeout(o.timer);
  if (code === 'rate_limited' || code === 'internal') {
    // Not stored: the protocol says to resend later with the same key.
    setOutState(o, 'waiting');
    o.timer = setTimeout(() => { if (S.outbox.get(o.key) === o) transmit(o); }, 1500 + Math.random() * 1500);
    return;
  }
  o.error = words(code, message);
  o.retriable = false;
  setOutState(o, 'failed');
  saveOutbox();
}

function retry(key) {
  const o = S.outbox.get(key);
  if (!o) return;
  if (W.state === 'offline') connect();
  transmit(o); // the same key: if the first attempt was stored, the server answers with its ack
  $('compose').focus();
}

function discard(key) {
  const o = S.outbox.get(key);
  if (!o) return;
  clearTimeout(o.timer);
  S.outbox.delete(key);
  saveOutbox();
  const c = S.channels.get(o.channel);
  if (c && S.current === c.id) renderMessages(c);
  $('compose').focus();
}

// ---------------------------------------------------------------- 7. presence

function presenceText(p) {
  if (!p) return '';
  if (p.status === 'online') return 'online';
  return p.last_active_at ? 'last active ' + ago(p.last_active_at) : 'offline';
}

function setPresence(p) {
  S.presence.set(p.user, { status: p.status, last_active_at: p.last_active_at });
  renderListSoon();
  if (S.current) renderHeader();
  if ($('members-dialog').open) renderMembers();
}

async function refreshPresence() {
  const users = new Set();
  for (const c of S.channels.values()) {
    if (c.summary && c.summary.kind === 'direct') users.add(c.summary.name);
  }
  const cur = S.current && S.channels.get(S.current);
  if (cur && cur.members) for (const m of cur.members.members) if (m.user !== me()) users.add(m.user);
  const all = [...users];
  for (let i = 0; i < all.length; i += 200) {
    try {
      const { presence } = await api('GET', '/v1/presence?users=' + enc(all.slice(i, i + 200).join(',')));
      for (const p of presence) S.presence.set(p.user, p);
    } catch { return; }
  }
  renderListSoon();
  if (S.current) renderHeader();
  if ($('members-dialog').open) renderMembers();
}

async function loadMembers(c) {
  try {
    c.members = await api('GET', '/v1/channels/' + enc(c.id) + '/members');
    if (S.current === c.id) renderHeader();
    if ($('members-dialog').open) renderMembers();
    const missing = c.members.members.filter((m) => m.user !== me() && !S.presence.has(m.user));
    if (missing.length) refreshPresence();
  } catch { /* the header keeps what it had */ }
}

// ---------------------------------------------------------------- dialogs

function dialogError(dialog, text) {
  const p = dialog.querySelector('.error');
  p.textContent = text || '';
  p.hidden = !text;
}

function openDialog(d) {
  dialogError(d, '');
  d.showModal();
}

for (const d of document.querySelectorAll('dialog')) {
  for (const b of d.querySelectorAll('.cancel')) b.addEventListener('click', () => d.close());
}

$('new-direct-btn').addEventListener('click', () => { $('direct-form').reset(); openDialog($('direct-dialog')); });
$('new-group-btn').addEventListener('click', () => { $('group-form').reset(); openDialog($('group-dialog')); });

// A form waiting for the server ignores further submits. (Its buttons are not
// disabled: that would take the keyboard focus away from them.)
function busy(form, on) {
  if (on && form.dataset.busy) return true;
  form.dataset.busy = on ? '1' : '';
  form.setAttribute('aria-busy', on ? 'true' : 'false');
  return false;
}

$('direct-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const d = $('direct-dialog');
  const user = $('direct-user').value.trim().toLowerCase();
  if (!user) return dialogError(d, 'Write the address of the person to chat with.');
  if (busy(e.target, true)) return undefined;
  try {
    const s = await api('POST', '/v1/direct', { user });
    setSummary(s);
    renderList();
    d.close();
    openConversation(s.id);
  } catch (err) {
    dialogError(d, err.message);
  } finally { busy(e.target, false); }
  return undefined;
});

$('group-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const d = $('group-dialog');
  const name = $('group-name').value.trim();
  const members = $('group-members').value.split(/[\s,;]+/).map((s) => s.trim().toLowerCase()).filter(Boolean);
  if (!name) return dialogError(d, 'Give the group a name.');
  if (busy(e.target, true)) return undefined;
  try {
    const s = await api('POST', '/v1/channels', { name, members });
    setSummary(s);
    renderList();
    d.close();
    openConversation(s.id);
  } catch (err) {
    dialogError(d, err.message);
  } finally { busy(e.target, false); }
  return undefined;
});

$('members-btn').addEventListener('click', () => {
  const c = S.channels.get(S.current);
  if (!c) return;
  openDialog($('members-dialog'));
  renderMembers();
  loadMembers(c);
});

function renderMembers() {
  const c = S.channels.get(S.current);
  if (!c) return;
  const group = c.summary && c.summary.kind === 'group';
  const list = c.members ? c.members.members : [];
  const amAdmin = list.some((m) => m.user === me() && m.role === 'admin');
  $('members-title').textContent = group ? 'Members of ' + title(c) : 'Direct chat with ' + title(c);
  $('member-list').replaceChildren(...list.map((m) => {
    const p = m.user === me() ? { status: W.state === 'online' ? 'online' : 'offline' } : S.presence.get(m.user);
    return el('li', { 'data-user': m.user },
      el('span', { class: 'dot ' + (p ? p.status : ''), 'aria-hidden': 'true' }),
      el('span', { class: 'name', text: (m.user === me() ? 'You' : m.user) + (m.role === 'admin' ? ' (admin)' : '') }),
      el('span', { class: 'muted', text: m.user === me() ? '' : presenceText(p) }),
      group && amAdmin && m.user !== me()
        ? el('button', { type: 'button', class: 'quiet', text: 'Remove', 'aria-label': 'Remove ' + m.user, onclick: () => removeMember(c, m.user) })
        : null);
  }));
  $('add-member-form').hidden = !(group && amAdmin);
  $('leave-btn').hidden = !group;
}

async function removeMember(c, user) {
  const d = $('members-dialog');
  try {
    c.members = await api('DELETE', '/v1/channels/' + enc(c.id) + '/members/' + enc(user));
    dialogError(d, '');
    renderMembers();
    fetchChannel(c.id);
  } catch (err) { dialogError(d, err.message); }
}

$('add-member-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const c = S.channels.get(S.current);
  const d = $('members-dialog');
  const user = $('add-member').value.trim().toLowerCase();
  if (!c || !user) return;
  if (busy(e.target, true)) return;
  try {
    c.members = await api('POST', '/v1/channels/' + enc(c.id) + '/members', { user });
    $('add-member').value = '';
    dialogError(d, '');
    renderMembers();
    fetchChannel(c.id);
    refreshPresence();
  } catch (err) {
    dialogError(d, err.message);
  } finally { busy(e.target, false); $('add-member').focus(); }
});

$('leave-btn').addEventListener('click', async () => {
  const c = S.channels.get(S.current);
  const d = $('members-dialog');
  if (!c) return;
  try {
    await api('POST', '/v1/channels/' + enc(c.id) + '/leave');
    d.close();
    forget(c.id);
    showConvError('');
    $('new-direct-btn').focus();
  } catch (err) { dialogError(d, err.message); }
});

// ---------------------------------------------------------------- composer and navigation

$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const t = $('compose');
  const body = t.value;
  if (!body.trim()) return;
  t.value = '';
  autosize();
  sendMessage(body);
  t.focus();
});

$('compose').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});

function autosize() {
  const t = $('compose');
  t.style.height = 'auto';
  const border = t.offsetHeight - t.clientHeight;
  t.style.height = Math.min(t.scrollHeight + border, 160) + 'px';
  t.style.overflowY = t.scrollHeight + border > 160 ? 'auto' : 'hidden';
}
$('compose').addEventListener('input', autosize);

$('messages').addEventListener('scroll', () => {
  const c = S.channels.get(S.current);
  if (c && $('messages').scrollTop < 120 && c.next) loadOlder(c);
});
$('older-btn').addEventListener('click', () => {
  const c = S.channels.get(S.current);
  if (c) loadOlder(c);
});

$('back-btn').addEventListener('click', () => {
  const id = S.current;
  S.current = null;
  renderConversation();
  renderList();
  const b = id && document.querySelector('#conv-list [data-channel="' + CSS.escape(id) + '"]');
  if (b) b.focus();
});

document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && S.current && !document.querySelector('dialog[open]') && window.matchMedia('(max-width: 700px)').matches) {
    $('back-btn').click();
  }
});

document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && S.current && S.unread[S.current]) {
    delete S.unread[S.current];
    saveUnread();
    renderList();
  }
});

$('reconnect-now').addEventListener('click', () => { W.attempt = 0; connect(); });
window.addEventListener('online', () => { if (W.state === 'offline' && !W.stopped) { W.attempt = 0; connect(); } });
window.addEventListener('offline', () => { if (W.state === 'offline') countdown(); });

// Relative times ("last active 5 minutes ago") age while the page is open.
setInterval(() => { if (S.current) renderHeader(); }, 60000);

// ---------------------------------------------------------------- 8. notifications
//
// Web Push (docs/protocol.md, section 14). Nothing happens on load but looking at what
// this browser already has: the service worker is registered, permission asked and
// the subscription made only when the person presses "Turn on notifications". What
// the service worker needs while no page is open (who is signed in, the target's id)
// is kept in Cache Storage, which it can read too.

const N = {
  supported: 'serviceWorker' in navigator && 'PushManager' in window && window.isSecureContext,
  on: false,
  busy: false,
  started: false, // notifyStart ran for this session
};
const PUSH_STATE = '/hearth-push-state';

async function pushState() {
  try {
    const r = await (await caches.open('hearth')).match(PUSH_STATE);
    return r ? await r.json() : null;
  } catch { return null; }
}

async function setPushState(st) {
  try {
    const c = await caches.open('hearth');
    if (st) await c.put(PUSH_STATE, new Response(JSON.stringify(st), { headers: { 'Content-Type': 'application/json' } }));
    else await c.delete(PUSH_STATE);
  } catch { /* storage disabled: the worker cannot renew a subscription alone */ }
}

function notifyError(text) {
  $('notify-error').textContent = text || '';
  $('notify-error').hidden = !text;
}

function renderNotify(state) {
  const b = $('notify-btn');
  const s = $('notify-state');
  if (!N.supported) {
    const why = !window.isSecureContext
      ? 'Notifications need a secure connection: open this page over https.'
      : 'This browser cannot receive notifications from web pages (it lacks service workers or push messaging).';
    s.textContent = 'Notifications are not available here.';
    s.title = why;
    s.setAttribute('aria-description', why);
    b.hidden = true;
    return;
  }
  b.hidden = false;
  b.textContent = N.on ? 'Turn off notifications' : 'Turn on notifications';
  s.textContent = state || (N.on ? 'Notifications on' : '');
  s.classList.toggle('on', N.on);
}

function keyBytes(b64url) {
  return Uint8Array.from(atob(b64url.replace(/-/g, '+').replace(/_/g, '/')), (c) => c.charCodeAt(0));
}

function sameBytes(a, b) {
  if (!a || !b) return false;
  const x = new Uint8Array(a);
  const y = new Uint8Array(b);
  return x.length === y.length && x.every((v, i) => v === y[i]);
}

// A promise that gives up after `ms`, rejecting with a TimeoutError.
function within(ms, p) {
  let t;
  const late = new Promise((_, no) => { t = setTimeout(() => no(new DOMException('no answer', 'TimeoutError')), ms); });
  return Promise.race([p, late]).finally(() => clearTimeout(t));
}

class NotifyError extends Error {}

const PUSH_SERVICE = 'its push service, the service run by the browser’s maker that delivers notifications';

// Words for what went wrong while subscribing.
function subscribeWords(e) {
  if (e && e.name === 'NotAllowedError') {
    return 'This browser does not allow this site to send notifications. Allow them in the site settings (the icon next to the address), then try again.';
  }
  if (e && e.name === 'TimeoutError') {
    return 'Notifications could not be turned on: this browser got no answer from ' + PUSH_SERVICE
      + ', within 20 seconds. It may be out of reach from here: check the internet connection, or try again later.';
  }
  return 'Notifications could not be turned on: this browser could not reach ' + PUSH_SERVICE
    + '. Check the internet connection, or try again later.'
    + (e && e.message ? ' (The browser said: ' + sentence(e.message) + ')' : '');
}

async function notifyOn() {
  const reg = await navigator.serviceWorker.register('/sw.js').catch((e) => {
    throw new NotifyError('The browser refused to install the notification helper (service worker): ' + sentence(e.message));
  });
  renderNotify('Asking for permission…');
  const perm = await Notification.requestPermission();
  if (perm === 'denied') {
    throw new NotifyError('This browser blocks notifications from this site. Allow them in the site settings (the icon next to the address), then press the button again.');
  }
  if (perm !== 'granted') throw new NotifyError('Notifications were not allowed. Press the button again and choose “Allow” when the browser asks.');
  renderNotify('Turning notifications on…');
  const { public_key } = await api('GET', '/v1/push/vapid');
  const key = keyBytes(public_key);
  await within(10000, navigator.serviceWorker.ready).catch(() => {
    throw new NotifyError('The notification helper (service worker) did not start. Reload the page and try again.');
  });
  let sub = await reg.pushManager.getSubscription();
  if (sub && !sameBytes(sub.options.applicationServerKey, key)) {
    await sub.unsubscribe(); // made for a key the server no longer has
    sub = null;
  }
  if (!sub) {
    const asked = reg.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key });
    try {
      sub = await within(20000, asked);
    } catch (e) {
      // Told the person it failed: a subscription that comes after all is dropped.
      asked.then((late) => late.unsubscribe(), () => null);
      throw new NotifyError(subscribeWords(e));
    }
  }
  let t;
  try {
    t = await api('POST', '/v1/push/targets', { kind: 'web_push', ...sub.toJSON() });
  } catch (e) {
    await sub.unsubscribe().catch(() => null);
    throw e;
  }
  await setPushState({ user: me(), token: S.session.token, target: t.id, endpoint: t.endpoint });
  N.on = true;
}

async function notifyOff() {
  const st = await pushState();
  if (st && st.target) {
    try {
      await api('DELETE', '/v1/push/targets/' + enc(st.target));
    } catch (e) {
      if (e.code !== 'unknown_push_target') throw e;
    }
  }
  const reg = await navigator.serviceWorker.getRegistration('/');
  const sub = reg && await reg.pushManager.getSubscription();
  if (sub) await sub.unsubscribe();
  await setPushState(null);
  N.on = false;
}

$('notify-btn').addEventListener('click', async () => {
  if (N.busy) return;
  N.busy = true;
  $('notify').setAttribute('aria-busy', 'true');
  notifyError('');
  const turningOn = !N.on;
  try {
    if (turningOn) await notifyOn(); else await notifyOff();
  } catch (e) {
    notifyError(e instanceof NotifyError || e instanceof ApiError
      ? e.message
      : (turningOn ? 'Notifications could not be turned on: ' : 'Notifications could not be turned off: ') + sentence(e && e.message));
  } finally {
    N.busy = false;
    $('notify').setAttribute('aria-busy', 'false');
    renderNotify();
  }
});

// On start: notifications are on if this browser still holds the subscription this
// user made. It is registered again (the server keeps one target per endpoint), which
// also catches a subscription the browser renewed while no page was open.
async function notifyStart() {
  renderNotify();
  loadPreviews();
  if (!N.supported) return;
  try {
    const st = await pushState();
    const reg = await navigator.serviceWorker.getRegistration('/');
    const sub = reg && await reg.pushManager.getSubscription();
    if (!st || st.user !== me() || !sub || Notification.permission !== 'granted') {
      if (sub && (!st || st.user !== me())) await sub.unsubscribe(); // left by someone signed out
      if (st && st.user === me() && st.target) api('DELETE', '/v1/push/targets/' + enc(st.target)).catch(() => null);
      if (st) await setPushState(null);
      N.on = false;
    } else {
      const t = await api('POST', '/v1/push/targets', { kind: 'web_push', ...sub.toJSON() });
      if (st.target && st.target !== t.id) api('DELETE', '/v1/push/targets/' + enc(st.target)).catch(() => null);
      await setPushState({ user: me(), token: S.session.token, target: t.id, endpoint: t.endpoint });
      N.on = true;
    }
  } catch { /* shown as it was; the button still works */ }
  renderNotify();
}

// Signing out: this browser's subscription goes (the server drops the device's
// targets itself).
function notifyForget() {
  N.on = false;
  N.started = false;
  notifyError('');
  if (!N.supported) return;
  setPushState(null);
  navigator.serviceWorker.getRegistration('/')
    .then((reg) => reg && reg.pushManager.getSubscription())
    .then((sub) => sub && sub.unsubscribe())
    .catch(() => null);
}

async function loadPreviews() {
  try {
    const s = await api('GET', '/v1/push/settings');
    $('notify-previews').checked = !!s.previews;
  } catch { /* stays as shown */ }
}

$('notify-previews').addEventListener('change', async (e) => {
  const box = e.target;
  notifyError('');
  try {
    const s = await api('PUT', '/v1/push/settings', { previews: box.checked });
    box.checked = !!s.previews;
  } catch (err) {
    box.checked = !box.checked;
    notifyError('The setting was not saved: ' + err.message);
  }
});

// A notification was clicked (see sw.js): open its conversation.
async function openFromNotice(channel, user) {
  if (!channel || !S.session || (user && user !== me())) return;
  if (!S.channels.has(channel) || !S.channels.get(channel).summary) await fetchChannel(channel);
  if (S.channels.has(channel)) openConversation(channel);
}

function openFromHash() {
  const m = /^#channel=(.+)$/.exec(location.hash);
  if (!m) return;
  history.replaceState(null, '', location.pathname + location.search);
  let id = '';
  try { id = decodeURIComponent(m[1]); } catch { return; }
  openFromNotice(id);
}

window.addEventListener('hashchange', () => { if (S.session && S.server) openFromHash(); });
if ('serviceWorker' in navigator) {
  navigator.serviceWorker.addEventListener('message', (e) => {
    if (e.data && e.data.type === 'open') openFromNotice(e.data.channel, e.data.user);
  });
  navigator.serviceWorker.startMessages();
}

// ---------------------------------------------------------------- sign-in and start-up

function show(view) {
  document.body.dataset.view = view;
  $('auth-view').hidden = view !== 'auth';
  $('chat-view').hidden = view !== 'chat';
}

function authError(text) {
  $('auth-error').textContent = text || '';
  $('auth-error').hidden = !text;
}

async function authenticate(register) {
  const username = $('auth-user').value.trim().toLowerCase();
  const password = $('auth-pass').value;
  if (!/^[a-z0-9._-]{1,32}$/.test(username)) {
    authError('A user name is 1 to 32 lowercase letters, digits, dots, dashes or underscores.');
    $('auth-user').focus();
    return;
  }
  if (register && password.length < 8) {
    authError('Choose a password of at least 8 characters.');
    $('auth-pass').focus();
    return;
  }
  authError('');
  if (busy($('auth-form'), true)) return;
  try {
    const ua = navigator.userAgentData && navigator.userAgentData.platform;
    const device_name = 'Web browser' + (ua ? ' on ' + ua : '');
    const session = await api('POST', register ? '/v1/register' : '/v1/login', { username, password, device_name });
    store.clear();
    S.session = session;
    store.set('session', session);
    $('auth-pass').value = '';
    await start();
  } catch (e) {
    authError(e.message);
  } finally {
    busy($('auth-form'), false);
  }
}

$('auth-form').addEventListener('submit', (e) => { e.preventDefault(); authenticate(false); });
$('register-btn').addEventListener('click', () => authenticate(true));

$('logout-btn').addEventListener('click', async () => {
  try { await api('POST', '/v1/logout'); } catch { /* the token is dropped here anyway */ }
  signedOut('');
});

function signedOut(message) {
  W.stopped = true;
  clearTimeout(W.timer);
  dropSocket();
  S.session = null;
  store.clear();
  S.channels.clear();
  S.outbox.clear();
  S.presence.clear();
  S.current = null;
  elements.clear();
  $('msg-list').replaceChildren();
  $('conv-list').replaceChildren();
  listItems.clear();
  W.state = 'offline';
  document.body.dataset.conn = 'offline';
  $('banner').hidden = true;
  notifyForget();
  show('auth');
  authError(message);
  $('auth-user').focus();
}

async function start(again) {
  if (!again) loadDeviceState();
  show('chat');
  if (!again && (!document.activeElement || document.activeElement === document.body || $('auth-view').contains(document.activeElement))) {
    $('new-direct-btn').focus();
  }
  $('me-name').textContent = who(S.session.user) || S.session.user;
  renderNotify();
  try {
    const info = await api('GET', '/v1/me');
    S.server = info.server;
    $('me-name').textContent = info.display_name || who(info.user);
    $('me-server').textContent = info.user;
    await refreshChannels();
  } catch (e) {
    if (!S.session) return; // signed out
    setConn('offline', e.message);
  }
  renderList();
  if (S.server) {
    openFromHash();
    if (!N.started) { N.started = true; notifyStart(); }
  }
  if (again) return;
  renderConversation();
  W.attempt = 0;
  connect();
}

$('auth-server').textContent = 'on ' + location.host;
if (S.session) start(); else { show('auth'); $('auth-user').focus(); }
