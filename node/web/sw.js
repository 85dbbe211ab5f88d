// Hearth service worker: shows push notifications (docs/protocol.md, section 14).
//
// It does nothing else: no fetch handler, no offline cache. The page registers it only
// when the person turns notifications on. What it knows of the session is what the
// page left in Cache Storage under STATE ({user, token, target, endpoint}), so that it
// can register a renewed subscription while no page is open.
'use strict';

const STATE = '/hearth-push-state';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (e) => e.waitUntil(self.clients.claim()));

// The notification: {v, user, channel, sender, count, ts, body?}. Each push must show
// something (userVisibleOnly), so a payload that cannot be read still gives one.
self.addEventListener('push', (e) => {
  let n = null;
  try { n = e.data ? e.data.json() : null; } catch { n = null; }
  if (!n || typeof n !== 'object') n = {};
  const count = Number(n.count) || 1;
  const title = n.sender || 'Hearth';
  const body = typeof n.body === 'string' && n.body
    ? n.body
    : count + ' new message' + (count === 1 ? '' : 's');
  const options = { body, data: n, timestamp: Number(n.ts) || Date.now() };
  // One notification per conversation: a newer one replaces it and alerts again.
  if (n.channel) { options.tag = n.channel; options.renotify = true; }
  e.waitUntil(self.registration.showNotification(title, options));
});

// A click opens the conversation: in a page already open (which is told over
// postMessage), or in a new one at /#channel=<id>.
self.addEventListener('notificationclick', (e) => {
  e.notification.close();
  const n = e.notification.data || {};
  e.waitUntil((async () => {
    const pages = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
    const mine = pages.filter((c) => new URL(c.url).origin === self.location.origin);
    const page = mine.find((c) => c.focused) || mine.find((c) => c.visibilityState === 'visible') || mine[0];
    if (page) {
      try { await page.focus(); } catch { /* not allowed: the message still opens it */ }
      page.postMessage({ type: 'open', channel: n.channel, user: n.user });
      return;
    }
    await self.clients.openWindow('/' + (n.channel ? '#channel=' + encodeURIComponent(n.channel) : ''));
  })());
});

async function loadState() {
  try {
    const r = await (await caches.open('hearth')).match(STATE);
    return r ? await r.json() : null;
  } catch { return null; }
}

async function saveState(st) {
  const c = await caches.open('hearth');
  await c.put(STATE, new Response(JSON.stringify(st), { headers: { 'Content-Type': 'application/json' } }));
}

function keyBytes(b64url) {
  return Uint8Array.from(atob(b64url.replace(/-/g, '+').replace(/_/g, '/')), (c) => c.charCodeAt(0));
}

// The push service replaced or dropped the subscription: subscribe again (when the
// browser has not already) and tell the server, replacing the old target. Best effort:
// a page that opens later registers whatever subscription it finds.
self.addEventListener('pushsubscriptionchange', (e) => {
  e.waitUntil((async () => {
    const st = await loadState();
    if (!st || !st.token) return;
    let sub = e.newSubscription || await self.registration.pushManager.getSubscription();
    if (!sub) {
      const { public_key } = await (await fetch('/v1/push/vapid')).json();
      sub = await self.registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: keyBytes(public_key) });
    }
    const headers = { Authorization: 'Bearer ' + st.token, 'Content-Type': 'application/json' };
    const res = await fetch('/v1/push/targets', { method: 'POST', headers, body: JSON.stringify({ kind: 'web_push', ...sub.toJSON() }) });
    if (!res.ok) return;
    const t = await res.json();
    if (st.target && st.target !== t.id) {
      await fetch('/v1/push/targets/' + encodeURIComponent(st.target), { method: 'DELETE', headers }).catch(() => null);
    }
    await saveState({ ...st, target: t.id, endpoint: t.endpoint });
  })());
});
