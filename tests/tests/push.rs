//! Push notifications against a local HTTP receiver that plays push service and
//! webhook endpoint: Web Push with real cryptography on both sides (the test holds
//! the subscription's key pair, checks the VAPID token against the node's key and
//! decrypts the body per RFC 8291 on its own), coalescing, online users, retries,
//! removal of gone targets, a hanging receiver, and messages from another server.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{Aes128Gcm, Nonce};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hearth_client_api::ErrorCode;
use hearth_client_api::http::{
    NewPushTarget, PushKind, PushNotification, PushSettings, WebPushKeys,
};
use hearth_client_api::model::PresenceStatus;
use hearth_node::Config;
use hearth_tests::{TestNode, TestUser, eventually, federated};
use p256::ecdsa::signature::Verifier;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::Sha256;

// ---- the receiver ----

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Status(u16),
    RetryAfter(u16, u64),
    Hang,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

#[derive(Default)]
struct Book {
    hits: HashMap<String, Vec<Hit>>,
    scripts: HashMap<String, VecDeque<Reply>>,
    hang_all: bool,
}

/// An HTTP server on loopback that records every request by path and answers as
/// scripted (201 when nothing is scripted).
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    book: Arc<Mutex<Book>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let book: Arc<Mutex<Book>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("address");
        let state = book.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move { answer(state, uri, headers, body).await }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, book }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn script(&self, path: &str, replies: &[Reply]) {
        self.book
            .lock()
            .expect("book")
            .scripts
            .insert(path.to_string(), replies.iter().copied().collect());
    }

    fn hang_everything(&self) {
        self.book.lock().expect("book").hang_all = true;
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        self.book
            .lock()
            .expect("book")
            .hits
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `path` got at least `n` requests; returns them all.
    async fn wait_hits(&self, path: &str, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hits = self.hits(path);
            if hits.len() >= n {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {} requests, not {n}, within 30 s",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn answer(book: Arc<Mutex<Book>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let reply = {
        let mut book = book.lock().expect("book");
        book.hits.entry(path.clone()).or_default().push(Hit {
            headers,
            body,
            at: Instant::now(),
        });
        if book.hang_all {
            Reply::Hang
        } else {
            book.scripts
                .get_mut(&path)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Reply::Status(201))
        }
    };
    let status = |s: u16| StatusCode::from_u16(s).expect("status");
    match reply {
        Reply::Status(s) => status(s).into_response(),
        Reply::RetryAfter(s, secs) => {
            (status(s), [("retry-after", secs.to_string())]).into_response()
        }
        Reply::Hang => std::future::pending().await,
    }
}

// ---- the browser's side of Web Push ----

/// A push subscription as a browser holds it: a P-256 key pair and an auth secret.
struct Subscription {
    secret: p256::SecretKey,
    auth: [u8; 16],
    endpoint: String,
}

impl Subscription {
    fn new(endpoint: String) -> Subscription {
        let mut auth = [0u8; 16];
        OsRng.fill_bytes(&mut auth);
        Subscription {
            secret: p256::SecretKey::random(&mut OsRng),
            auth,
            endpoint,
        }
    }

    fn public_bytes(&self) -> Vec<u8> {
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    /// What `PushSubscription.toJSON()` plus `kind` gives.
    fn target(&self) -> NewPushTarget {
        NewPushTarget {
            kind: PushKind::WebPush,
            endpoint: self.endpoint.clone(),
            keys: Some(WebPushKeys {
                p256dh: URL_SAFE_NO_PAD.encode(self.public_bytes()),
                auth: URL_SAFE_NO_PAD.encode(self.auth),
            }),
        }
    }

    /// Decrypts an `aes128gcm` body per RFC 8291 and RFC 8188, written out here
    /// independently of the node's crate.
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        let hkdf = |salt: &[u8], ikm: &[u8], info: &[u8], len: usize| {
            let mut out = vec![0u8; len];
            hkdf::Hkdf::<Sha256>::new(Some(salt), ikm)
                .expand(info, &mut out)
                .expect("hkdf length");
            out
        };
        let salt = &body[..16];
        let rs = u32::from_be_bytes(body[16..20].try_into().expect("rs"));
        let idlen = body[20] as usize;
        let server_public = &body[21..21 + idlen];
        let ciphertext = &body[21 + idlen..];
        assert_eq!(
            idlen, 65,
            "the key id is the server's uncompressed public key"
        );
        assert!(ciphertext.len() <= rs as usize, "one record");
        let server_key = p256::PublicKey::from_sec1_bytes(server_public).expect("server key");
        let shared =
            p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), server_key.as_affine());
        let mut info = b"WebPush: info\0".to_vec();
        info.extend_from_slice(&self.public_bytes());
        info.extend_from_slice(server_public);
        let ikm = hkdf(&self.auth, shared.raw_secret_bytes().as_slice(), &info, 32);
        let cek = hkdf(salt, &ikm, b"Content-Encoding: aes128gcm\0", 16);
        let nonce = hkdf(salt, &ikm, b"Content-Encoding: nonce\0", 12);
        let mut plain = Aes128Gcm::new_from_slice(&cek)
            .expect("key")
            .decrypt(Nonce::from_slice(&nonce), ciphertext)
            .expect("the body decrypts with the subscription's key");
        while plain.last() == Some(&0) {
            plain.pop();
        }
        assert_eq!(plain.pop(), Some(2), "last-record delimiter");
        plain
    }
}

/// Checks the `Authorization: vapid t=…, k=…` header: `k` is the node's key, the
/// ES256 token verifies against it, and its claims are right.
fn check_vapid(headers: &HeaderMap, node_key: &str, audience: &str, contact: &str) {
    let auth = headers
        .get("authorization")
        .expect("an Authorization header")
        .to_str()
        .expect("ascii");
    let rest = auth.strip_prefix("vapid ").expect("vapid scheme");
    let mut token = None;
    let mut key = None;
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(t) = part.strip_prefix("t=") {
            token = Some(t);
        } else if let Some(k) = part.strip_prefix("k=") {
            key = Some(k);
        }
    }
    let (token, key) = (token.expect("t="), key.expect("k="));
    assert_eq!(key, node_key, "the token names the node's VAPID key");
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(
        &URL_SAFE_NO_PAD.decode(node_key).expect("base64url key"),
    )
    .expect("a P-256 key");
    let (signed, signature) = token.rsplit_once('.').expect("three parts");
    let signature = p256::ecdsa::Signature::from_slice(
        &URL_SAFE_NO_PAD
            .decode(signature)
            .expect("base64url signature"),
    )
    .expect("64-byte ES256 signature");
    verifying
        .verify(signed.as_bytes(), &signature)
        .expect("the VAPID token verifies against the node's public key");
    let (header, claims) = signed.split_once('.').expect("header.claims");
    let json = |part: &str| -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
    };
    assert_eq!(json(header)["alg"], "ES256");
    let claims = json(claims);
    assert_eq!(claims["aud"], audience);
    assert_eq!(claims["sub"], contact);
    let exp = claims["exp"].as_u64().expect("exp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        exp > now && exp <= now + 24 * 3600,
        "exp within 24 h (RFC 8292)"
    );
}

// ---- helpers ----

fn push_settings(c: &mut Config, window_ms: u64) {
    c.push_allow_private = true;
    c.push_coalesce_ms = window_ms;
    c.push_contact = "mailto:ops@hearth.test".into();
}

async fn push_node(window_ms: u64) -> TestNode {
    TestNode::start_with(|c| push_settings(c, window_ms)).await
}

fn webhook(url: String) -> NewPushTarget {
    NewPushTarget {
        kind: PushKind::Webhook,
        endpoint: url,
        keys: None,
    }
}

fn notification(hit: &Hit) -> PushNotification {
    serde_json::from_slice(&hit.body).expect("a notification as JSON")
}

async fn wait_offline(watcher: &TestUser, user: &str) {
    let api = watcher.api.clone();
    let user = user.to_string();
    eventually("the user is offline", || {
        let api = api.clone();
        let user = user.clone();
        async move {
            api.presence([user.as_str()]).await.is_ok_and(|p| {
                p.presence
                    .iter()
                    .all(|i| i.status == PresenceStatus::Offline)
            })
        }
    })
    .await;
}

// ---- the tests ----

#[tokio::test]
async fn an_offline_users_browser_gets_an_encrypted_signed_web_push() {
    let rx = Receiver::start().await;
    let node = push_node(100).await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let vapid = node
        .client()
        .vapid_key()
        .await
        .expect("VAPID key")
        .public_key;
    let sub = Subscription::new(rx.url("/wp/alice"));
    let target = alice
        .api
        .add_push_target(&sub.target())
        .await
        .expect("subscribe");
    assert_eq!(target.kind, PushKind::WebPush);
    assert!(target.current);

    let mut b = bob.connect().await;
    let (_, channel) = b.send_to("alice", "a secret plan").await;
    let hits = rx.wait_hits("/wp/alice", 1).await;
    let hit = &hits[0];
    assert_eq!(hit.headers["content-encoding"], "aes128gcm");
    assert!(hit.headers.contains_key("ttl"));
    assert_eq!(hit.headers["urgency"], "high");
    check_vapid(
        &hit.headers,
        &vapid,
        &format!("http://{}", rx.addr),
        "mailto:ops@hearth.test",
    );
    let plain = sub.decrypt(&hit.body);
    let got: PushNotification = serde_json::from_slice(&plain).expect("JSON notification");
    assert_eq!(
        got,
        PushNotification {
            v: 1,
            user: "alice@localhost".into(),
            channel: channel.clone(),
            sender: "bob@localhost".into(),
            count: 1,
            ts: got.ts,
            body: None,
        },
        "no message text without previews"
    );
    assert!(!String::from_utf8_lossy(&hit.body).contains("secret"));

    alice
        .api
        .set_push_settings(&PushSettings { previews: true })
        .await
        .expect("previews on");
    assert!(alice.api.push_settings().await.expect("settings").previews);
    b.send_to("alice", "meet at noon").await;
    let hits = rx.wait_hits("/wp/alice", 2).await;
    let got: PushNotification =
        serde_json::from_slice(&sub.decrypt(&hits[1].body)).expect("JSON notification");
    assert_eq!(got.body.as_deref(), Some("meet at noon"));
    assert_eq!(got.count, 1);
    // The push service counts a push once the push service's answer is back, which
    // can come after the receiver has recorded the request.
    eventually("both pushes counted as sent", || {
        let sent = node.metric("hearth_push_sent_total");
        async move { sent == 2.0 }
    })
    .await;

    // The key pair is kept across restarts, so subscriptions stay valid.
    let mut node = node;
    node.restart().await;
    assert_eq!(
        node.client()
            .vapid_key()
            .await
            .expect("VAPID key")
            .public_key,
        vapid
    );
}

#[tokio::test]
async fn an_online_user_gets_no_push_and_a_burst_becomes_one_notification() {
    let rx = Receiver::start().await;
    let node = push_node(1000).await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    alice
        .api
        .add_push_target(&webhook(rx.url("/hook/alice")))
        .await
        .expect("webhook");
    let a = alice.connect().await;
    let mut b = bob.connect().await;
    for i in 0..3 {
        b.send_to("alice", &format!("while online {i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rx.hits("/hook/alice").is_empty(),
        "online users get no push"
    );

    a.close().await;
    wait_offline(&bob, "alice@localhost").await;
    let mut channel = String::new();
    for i in 0..5 {
        channel = b.send_to("alice", &format!("burst {i}")).await.1;
    }
    let hits = rx.wait_hits("/hook/alice", 1).await;
    assert_eq!(hits[0].headers["content-type"], "application/json");
    let got = notification(&hits[0]);
    assert_eq!(
        (got.channel.as_str(), got.sender.as_str(), got.count),
        (channel.as_str(), "bob@localhost", 5)
    );
    assert_eq!(got.body, None);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rx.hits("/hook/alice").len(),
        1,
        "one notification per window"
    );
}

#[tokio::test]
async fn failures_are_retried_and_gone_targets_removed() {
    let rx = Receiver::start().await;
    let node = push_node(50).await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    rx.script("/retry", &[Reply::Status(500), Reply::Status(200)]);
    rx.script("/later", &[Reply::RetryAfter(503, 3), Reply::Status(204)]);
    rx.script("/gone", &[Reply::Status(410)]);
    let sub = Subscription::new(rx.url("/gone"));
    for target in [
        webhook(rx.url("/retry")),
        webhook(rx.url("/later")),
        sub.target(),
    ] {
        alice.api.add_push_target(&target).await.expect("target");
    }
    assert_eq!(
        alice.api.push_targets().await.expect("list").targets.len(),
        3
    );

    let mut b = bob.connect().await;
    b.send_to("alice", "are you there?").await;

    let retried = rx.wait_hits("/retry", 2).await;
    assert_eq!(notification(&retried[0]), notification(&retried[1]));
    let later = rx.wait_hits("/later", 2).await;
    let gap = later[1].at - later[0].at;
    assert!(
        gap >= Duration::from_millis(2900),
        "Retry-After honoured: {gap:?}"
    );
    let gone = alice.api.clone();
    eventually("the gone target is removed", || {
        let api = gone.clone();
        async move { api.push_targets().await.is_ok_and(|l| l.targets.len() == 2) }
    })
    .await;
    assert!(
        alice
            .api
            .push_targets()
            .await
            .expect("list")
            .targets
            .iter()
            .all(|t| t.endpoint != sub.endpoint)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rx.hits("/retry").len(),
        2,
        "delivered once, after one retry"
    );
    assert_eq!(rx.hits("/later").len(), 2);
    assert_eq!(rx.hits("/gone").len(), 1);
    assert_eq!(node.metric("hearth_push_sent_total"), 2.0);
    assert_eq!(node.metric("hearth_push_retried_total"), 2.0);
    assert_eq!(node.metric("hearth_push_removed_total"), 1.0);
    assert_eq!(node.metric("hearth_push_failed_total"), 0.0);
    assert_eq!(node.services().push.queued(), 0);
}

#[tokio::test]
async fn a_hanging_push_service_does_not_delay_chat() {
    let rx = Receiver::start().await;
    rx.hang_everything();
    let mut node = TestNode::start_with(|c| {
        push_settings(c, 0);
        c.push_timeout_secs = 60;
    })
    .await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    for i in 0..3 {
        alice
            .api
            .add_push_target(&webhook(rx.url(&format!("/stuck/{i}"))))
            .await
            .expect("target");
    }
    let mut b = bob.connect().await;
    let mut c = carol.connect().await;
    b.send_to("alice", "first").await;
    rx.wait_hits("/stuck/0", 1).await;

    // Every push request now hangs (for up to the 60 s timeout), and more pile up
    // behind them; each message is still acknowledged and delivered at once.
    for i in 0..20 {
        let started = Instant::now();
        b.send_to("alice", &format!("to the offline user {i}"))
            .await;
        b.send_to("carol", &format!("to the online user {i}")).await;
        assert_eq!(c.message().await.1, format!("to the online user {i}"));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "round {i} took {took:?}");
    }
    rx.wait_hits("/stuck/0", 2).await;

    // Shutdown does not wait for the hanging requests either.
    let stopping = Instant::now();
    node.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn targets_are_checked_listed_removed_and_go_with_their_device() {
    let rx = Receiver::start().await;
    let node = push_node(100).await;
    let alice = node.user("alice").await;
    let phone = node.login(&alice).await;
    let laptop_hook = alice
        .api
        .add_push_target(&webhook(rx.url("/laptop")))
        .await
        .expect("laptop target");
    let again = alice
        .api
        .add_push_target(&webhook(rx.url("/laptop")))
        .await
        .expect("registering again");
    assert_eq!(again.id, laptop_hook.id, "the same endpoint is one target");
    let phone_sub = Subscription::new(rx.url("/phone"));
    let phone_target = phone
        .api
        .add_push_target(&phone_sub.target())
        .await
        .expect("phone target");
    let listed = alice.api.push_targets().await.expect("list").targets;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|t| t.id == phone_target.id && !t.current));

    // Bad registrations.
    fn code<T: std::fmt::Debug>(r: Result<T, hearth_client_api::ClientError>) -> Option<ErrorCode> {
        r.expect_err("refused").code()
    }
    let mut no_keys = phone_sub.target();
    no_keys.keys = None;
    assert_eq!(
        code(alice.api.add_push_target(&no_keys).await),
        Some(ErrorCode::InvalidField)
    );
    let mut bad_key = phone_sub.target();
    if let Some(k) = bad_key.keys.as_mut() {
        k.auth = "c2hvcnQ".into();
    }
    assert_eq!(
        code(alice.api.add_push_target(&bad_key).await),
        Some(ErrorCode::InvalidField)
    );
    assert_eq!(
        code(
            alice
                .api
                .add_push_target(&webhook("ftp://x.test/".into()))
                .await
        ),
        Some(ErrorCode::InvalidField)
    );
    assert_eq!(
        code(alice.api.remove_push_target("nope").await),
        Some(ErrorCode::UnknownPushTarget)
    );

    // Logging the phone out takes its subscription with it.
    phone.api.logout().await.expect("logout");
    let listed = alice.api.push_targets().await.expect("list").targets;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, laptop_hook.id);
    alice
        .api
        .remove_push_target(&laptop_hook.id)
        .await
        .expect("remove");
    assert!(
        alice
            .api
            .push_targets()
            .await
            .expect("list")
            .targets
            .is_empty()
    );

    // A node left at its defaults refuses private addresses.
    let strict = TestNode::start().await;
    let dave = strict.user("dave").await;
    assert_eq!(
        code(
            dave.api
                .add_push_target(&webhook(rx.url("/internal")))
                .await
        ),
        Some(ErrorCode::InvalidField)
    );
}

#[tokio::test]
async fn a_message_from_another_server_notifies_a_local_offline_user() {
    let rx = Receiver::start().await;
    let a = TestNode::start_with(|c| {
        federated(c, "a.test", vec![]);
        push_settings(c, 100);
    })
    .await;
    let b = TestNode::server("b.test", &a.federation_addrs().await).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let sub = Subscription::new(rx.url("/wp/alice"));
    alice
        .api
        .add_push_target(&sub.target())
        .await
        .expect("subscribe");

    let mut bo = bob.connect().await;
    let (_, channel) = bo.send_to("alice@a.test", "hello across servers").await;
    let hits = rx.wait_hits("/wp/alice", 1).await;
    let got: PushNotification =
        serde_json::from_slice(&sub.decrypt(&hits[0].body)).expect("JSON notification");
    assert_eq!(got.user, "alice@a.test");
    assert_eq!(got.sender, "bob@b.test");
    assert_eq!(got.channel, channel);
    assert_eq!(got.count, 1);
}
