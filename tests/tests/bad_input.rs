//! Bad input over real sockets: malformed, unknown, oversized and unauthenticated frames,
//! bad tokens, revoked devices, silent and slow clients, rate limits, bad HTTP requests
//! and refused sends. Each case checks the exact refusal, and that the node is still up
//! and its stored history untouched afterwards.
//!
//! Where the typed client refuses to send something (broken JSON, binary frames,
//! oversized frames, a frame before `auth`), the tests speak raw WebSocket
//! ([`Raw`]) and raw HTTP (`reqwest`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hearth_client_api::model::{Event, EventContent};
use hearth_client_api::{ClientFrame, ErrorCode, close};
use hearth_node::Config;
use hearth_tests::{PASSWORD, TestNode, TestUser, WAIT};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The default `max_frame_bytes`.
const MAX_FRAME: usize = 64 * 1024;
/// The default `max_body_bytes`.
const MAX_BODY: usize = 16 * 1024;
/// The node's HTTP body limit.
const MAX_HTTP_BODY: usize = 64 * 1024;
/// Body of the message every case stores before its bad input.
const FIRST_BODY: &str = "stored before the bad input";

// ---------------------------------------------------------------------------------
// A raw WebSocket client: sends any bytes, reads frames as JSON.

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What came next on a raw socket.
#[derive(Debug)]
enum Next {
    /// A text frame, parsed.
    Frame(Value),
    /// The server's close frame with its code, or `None` when the connection ended
    /// without one (dropped, reset).
    Closed(Option<u16>),
}

/// A WebSocket session without the typed client's safety nets.
struct Raw {
    ws: Ws,
    keys: u64,
}

fn ws_url(node: &TestNode) -> String {
    format!("ws://{}/v1/ws", node.addr)
}

impl Raw {
    /// Opens the socket; nothing is sent.
    async fn open(node: &TestNode) -> Raw {
        // Nagle off, as the real client does: pipelined small frames must not wait.
        let connect = tokio_tungstenite::connect_async_with_config(ws_url(node), None, true);
        let (ws, _) = tokio::time::timeout(WAIT, connect)
            .await
            .expect("upgrade in time")
            .expect("upgrade");
        Raw { ws, keys: 0 }
    }

    /// Opens the socket with a tiny kernel receive buffer, so that a client that does
    /// not read fills it (and the server's send side) after a few kilobytes.
    async fn open_small_window(node: &TestNode) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let tcp = socket.connect(node.addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(ws_url(node), MaybeTlsStream::Plain(tcp)),
        )
        .await
        .expect("upgrade in time")
        .expect("upgrade");
        Raw { ws, keys: 0 }
    }

    /// Opens the socket and authenticates as `user`'s device, reading the backlog.
    async fn authed(node: &TestNode, user: &TestUser) -> Raw {
        let mut raw = Raw::open(node).await;
        raw.auth(user.api.token()).await;
        raw
    }

    /// Sends `auth`, expects `ready`, and reads the backlog to its end; returns `ready`.
    async fn auth(&mut self, token: &str) -> Value {
        self.send_json(json!({"type": "auth", "v": 1, "token": token}))
            .await;
        let ready = self.frame().await;
        assert_eq!(ready["type"], "ready", "auth is answered by ready: {ready}");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let f = self.frame_by(deadline).await;
            if f["type"] == "sync" && f["more"] == false {
                return ready;
            }
        }
    }

    fn key(&mut self) -> String {
        self.keys += 1;
        format!("raw-{}", self.keys)
    }

    async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::text(text.into()))
            .await
            .expect("write a text frame");
    }

    async fn send_json(&mut self, frame: Value) {
        self.send_text(frame.to_string()).await;
    }

    /// The next text frame or the end of the connection, within `deadline`.
    async fn next_by(&mut self, deadline: tokio::time::Instant) -> Next {
        loop {
            let msg = timeout_at(deadline, self.ws.next())
                .await
                .expect("the server answers in time");
            match msg {
                None | Some(Err(_)) => return Next::Closed(None),
                Some(Ok(Message::Text(t))) => {
                    return Next::Frame(serde_json::from_str(t.as_str()).expect("frames are JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Next::Closed(Some(frame.map_or(1005, |f| u16::from(f.code))));
                }
                Some(Ok(Message::Binary(_))) => panic!("the server sent a binary frame"),
                Some(Ok(_)) => continue,
            }
        }
    }

    async fn frame_by(&mut self, deadline: tokio::time::Instant) -> Value {
        match self.next_by(deadline).await {
            Next::Frame(f) => f,
            Next::Closed(code) => panic!("the session ended ({code:?}) where a frame was due"),
        }
    }

    /// The next frame; the session must still be open.
    async fn frame(&mut self) -> Value {
        self.frame_by(tokio::time::Instant::now() + WAIT).await
    }

    /// The next error frame, skipping live events and presence: `(code, key)`.
    async fn error(&mut self) -> (String, Option<String>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let f = self.frame_by(deadline).await;
            match f["type"].as_str() {
                Some("event" | "presence") => continue,
                Some("error") => return error_parts(&f),
                _ => panic!("expected an error frame, got {f}"),
            }
        }
    }

    /// Waits for the server to end the connection, skipping frames; the close code, or
    /// `None` if the connection ended without a close frame.
    async fn closed(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.next_by(deadline).await {
                Next::Frame(_) => continue,
                Next::Closed(code) => return code,
            }
        }
    }

    /// The `ack` or `error` frame answering the send with `key`.
    async fn answer(&mut self, key: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let f = self.frame_by(deadline).await;
            if matches!(f["type"].as_str(), Some("ack" | "error")) && f["key"] == key {
                return f;
            }
        }
    }

    /// Sends `frame` (a `send` with `key`) and expects its ack; returns the event id.
    async fn send_acked(&mut self, key: &str, frame: Value) -> String {
        self.send_json(frame).await;
        let answer = self.answer(key).await;
        assert_eq!(answer["type"], "ack", "the send is accepted: {answer}");
        answer["event_id"]
            .as_str()
            .expect("ack carries the event id")
            .to_string()
    }

    /// Sends a direct message with a fresh key and expects its ack as the very next
    /// answer (live events and presence aside): the session works, and nothing sent
    /// before was answered with a stray error.
    async fn still_sends(&mut self, to: &str) -> String {
        let key = self.key();
        self.send_json(send_to(&key, to, "the session still works"))
            .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let f = self.frame_by(deadline).await;
            if matches!(f["type"].as_str(), Some("event" | "presence")) {
                continue;
            }
            assert_eq!(f["type"], "ack", "the next answer is the ack: {f}");
            assert_eq!(f["key"], key.as_str(), "{f}");
            return f["event_id"].as_str().expect("event id").to_string();
        }
    }
}

/// `(code, key)` of an error frame, after checking its shape.
fn error_parts(f: &Value) -> (String, Option<String>) {
    assert_eq!(f["type"], "error");
    assert!(
        f["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error frame explains itself: {f}"
    );
    let code = f["code"].as_str().expect("a string code").to_string();
    let key = f
        .get("key")
        .map(|k| k.as_str().expect("key is a string").to_string());
    (code, key)
}

fn err(code: &str, key: Option<&str>) -> (String, Option<String>) {
    (code.to_string(), key.map(str::to_string))
}

fn send_to(key: &str, to: &str, body: &str) -> Value {
    json!({"type": "send", "key": key, "to": to, "body": body})
}

fn send_in(key: &str, channel: &str, body: &str) -> Value {
    json!({"type": "send", "key": key, "channel": channel, "body": body})
}

fn body_of(e: &Event) -> Option<&str> {
    match &e.content {
        EventContent::Message { body } => Some(body),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------
// Raw HTTP.

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// Checks that `res` is a problem document with `status` and `code`; returns it.
async fn problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    let got_status = res.status().as_u16();
    let content_type = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = res.text().await.expect("response body");
    assert_eq!(got_status, status, "status of {text}");
    assert_eq!(content_type, "application/problem+json", "{text}");
    let doc: Value = serde_json::from_str(&text).expect("the problem is JSON");
    assert_eq!(doc["code"], code, "{doc}");
    assert_eq!(doc["type"], format!("urn:hearth:error:{code}"), "{doc}");
    assert_eq!(
        doc["status"], status,
        "the document repeats the status: {doc}"
    );
    assert!(doc["detail"].as_str().is_some(), "{doc}");
    doc
}

// ---------------------------------------------------------------------------------
// A node with two users and one stored message, and the check that it survived.

struct World {
    node: TestNode,
    alice: TestUser,
    bob: TestUser,
    /// The direct channel of alice and bob.
    direct: String,
    /// The event stored before any bad input.
    first: String,
}

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(tweak: impl FnOnce(&mut Config)) -> World {
    let node = TestNode::start_with(tweak).await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    let (first, direct) = a.send_to(&bob.id, FIRST_BODY).await;
    a.close().await;
    World {
        node,
        alice,
        bob,
        direct,
        first,
    }
}

impl World {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.node.url())
    }

    /// The node is up, the earlier message is stored unchanged, and a new session of
    /// another user can still send.
    async fn assert_intact(&self) {
        let health = http()
            .get(self.url("/healthz"))
            .send()
            .await
            .expect("healthz answers");
        assert_eq!(health.status().as_u16(), 200);
        assert_eq!(health.text().await.expect("body"), "ok\n");

        let history = self
            .bob
            .api
            .history(&self.direct, None, Some(200))
            .await
            .expect("history");
        let first: Vec<&Event> = history
            .events
            .iter()
            .filter(|e| e.id == self.first)
            .collect();
        assert_eq!(first.len(), 1, "the earlier message is stored once");
        assert_eq!(first[0].sender, self.alice.id);
        assert_eq!(body_of(first[0]), Some(FIRST_BODY));

        let mut b = self.bob.connect().await;
        let (id, channel) = b.send_to(&self.alice.id, "the node still serves").await;
        assert_eq!(channel, self.direct);
        let newest = self
            .alice
            .api
            .history(&self.direct, None, Some(1))
            .await
            .expect("history");
        assert_eq!(newest.events[0].id, id);
        b.close().await;
    }
}

// ---------------------------------------------------------------------------------
// 1-4: malformed, unknown, oversized and binary frames.

#[tokio::test]
async fn malformed_json_frames_get_bad_request_and_the_session_goes_on() {
    let w = world().await;
    let mut a = Raw::authed(&w.node, &w.alice).await;
    for bad in [
        r#"{"type":"send","key":"k1","to":"bob"#, // cut off
        "not json at all",
        "[1,2,3]",                       // not an object
        r#"{"kind":"heartbeat"}"#,       // no type
        r#"{"type":7}"#,                 // type not a string
        r#"{"type":"send","key":"k2"}"#, // a send without target and body
        r#"{"type":"cursor","pos":"high"}"#,
    ] {
        a.send_text(bad).await;
        assert_eq!(a.error().await, err("bad_request", None), "for {bad}");
    }
    a.send_json(json!({"type": "heartbeat"})).await;
    a.still_sends(&w.bob.id).await;
    w.assert_intact().await;
}

#[tokio::test]
async fn unknown_frame_types_get_unknown_frame_and_the_session_goes_on() {
    let w = world().await;
    let mut a = Raw::authed(&w.node, &w.alice).await;
    for bad in [r#"{"type":"dance"}"#, r#"{"type":"SEND","key":"k"}"#] {
        a.send_text(bad).await;
        assert_eq!(a.error().await, err("unknown_frame", None), "for {bad}");
    }
    a.still_sends(&w.bob.id).await;
    w.assert_intact().await;
}

/// A frame of `size` bytes that would be valid if it were small.
fn padded_heartbeat(size: usize) -> String {
    let overhead = r#"{"type":"heartbeat","pad":""}"#.len();
    let frame = format!(
        r#"{{"type":"heartbeat","pad":"{}"}}"#,
        "x".repeat(size - overhead)
    );
    assert_eq!(frame.len(), size);
    frame
}

#[tokio::test]
async fn a_frame_over_the_limit_gets_too_large_and_the_session_goes_on() {
    let w = world().await;
    let mut a = Raw::authed(&w.node, &w.alice).await;
    // Exactly the limit is accepted: a heartbeat is not answered, so the next answer
    // is the ack of the send after it.
    a.send_text(padded_heartbeat(MAX_FRAME)).await;
    a.still_sends(&w.bob.id).await;
    a.send_text(padded_heartbeat(MAX_FRAME + 1)).await;
    assert_eq!(a.error().await, err("too_large", None));
    a.send_text(padded_heartbeat(2 * MAX_FRAME - 16)).await;
    assert_eq!(a.error().await, err("too_large", None));
    a.still_sends(&w.bob.id).await;
    w.assert_intact().await;
}

#[tokio::test]
async fn a_frame_over_twice_the_limit_closes_the_connection_with_1009() {
    let w = world().await;
    let mut a = Raw::authed(&w.node, &w.alice).await;
    // The server may stop reading half-way, so the write itself may fail.
    let _ =
        a.ws.send(Message::text(padded_heartbeat(2 * MAX_FRAME + 1024)))
            .await;
    // Dropped without a close frame (None) is also an end of the connection.
    if let Some(code) = a.closed().await {
        assert_eq!(code, close::MESSAGE_TOO_BIG);
    }
    w.assert_intact().await;
}

#[tokio::test]
async fn a_binary_frame_gets_bad_request_and_the_session_goes_on() {
    let w = world().await;
    let mut a = Raw::authed(&w.node, &w.alice).await;
    let heartbeat = br#"{"type":"heartbeat"}"#.to_vec();
    a.ws.send(Message::binary(heartbeat))
        .await
        .expect("write a binary frame");
    assert_eq!(a.error().await, err("bad_request", None));
    a.still_sends(&w.bob.id).await;
    w.assert_intact().await;
}

// ---------------------------------------------------------------------------------
// 5-8: tokens, versions, revoked devices, silent clients, frames before auth.

#[tokio::test]
async fn http_without_a_valid_token_is_401_unauthorized() {
    let w = world().await;
    for path in ["/v1/me", "/v1/channels", "/v1/devices"] {
        let res = http().get(w.url(path)).send().await.expect("answer");
        problem(res, 401, "unauthorized").await;
        for header in [
            "Bearer not-a-token",
            "Bearer ",
            "Basic YWxpY2U6cGFzc3dvcmQ=",
            w.alice.api.token(), // the token without the scheme
        ] {
            let res = http()
                .get(w.url(path))
                .header(AUTHORIZATION, header)
                .send()
                .await
                .expect("answer");
            problem(res, 401, "unauthorized").await;
        }
    }
    let res = http()
        .post(w.url("/v1/logout"))
        .header(AUTHORIZATION, "Bearer not-a-token")
        .send()
        .await
        .expect("answer");
    problem(res, 401, "unauthorized").await;
    w.assert_intact().await;
}

#[tokio::test]
async fn a_bad_token_in_the_auth_frame_gets_unauthorized_then_close_4001() {
    let w = world().await;
    let long = "t".repeat(200);
    for token in ["not-a-token", "", long.as_str()] {
        let mut raw = Raw::open(&w.node).await;
        raw.send_json(json!({"type": "auth", "v": 1, "token": token}))
            .await;
        assert_eq!(raw.error().await, err("unauthorized", None));
        assert_eq!(raw.closed().await, Some(close::UNAUTHORIZED));
    }
    w.assert_intact().await;
}

#[tokio::test]
async fn a_wrong_protocol_version_gets_unsupported_version_then_close_4002() {
    let w = world().await;
    let mut raw = Raw::open(&w.node).await;
    raw.send_json(json!({"type": "auth", "v": 99, "token": w.alice.api.token()}))
        .await;
    assert_eq!(raw.error().await, err("unsupported_version", None));
    assert_eq!(raw.closed().await, Some(close::UNSUPPORTED_VERSION));
    w.assert_intact().await;
}

#[tokio::test]
async fn logging_out_closes_the_devices_session_with_4006_and_voids_its_token() {
    let w = world().await;
    let phone = w.node.login(&w.alice).await;
    let mut p = phone.connect().await;
    phone.api.logout().await.expect("logout");
    assert_eq!(p.closed().await, close::LOGGED_OUT);

    // A new session with the old token.
    let mut raw = Raw::open(&w.node).await;
    raw.send_json(json!({"type": "auth", "v": 1, "token": phone.api.token()}))
        .await;
    assert_eq!(raw.error().await, err("unauthorized", None));
    assert_eq!(raw.closed().await, Some(close::UNAUTHORIZED));

    // HTTP with the old token.
    let res = http()
        .get(w.url("/v1/me"))
        .header(AUTHORIZATION, format!("Bearer {}", phone.api.token()))
        .send()
        .await
        .expect("answer");
    problem(res, 401, "unauthorized").await;
    let again = phone.api.logout().await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::Unauthorized));

    // Alice's other device is untouched.
    let mut a = Raw::authed(&w.node, &w.alice).await;
    a.still_sends(&w.bob.id).await;
    w.assert_intact().await;
}

#[tokio::test]
async fn a_client_that_never_authenticates_is_closed_with_4003() {
    let w = world_with(|c| c.auth_timeout_secs = 1).await;
    let mut raw = Raw::open(&w.node).await;
    // Raw::closed is bounded by WAIT (10 s); the node closes after about 1 s.
    assert_eq!(raw.closed().await, Some(close::AUTH_TIMEOUT));
    w.assert_intact().await;
}

#[tokio::test]
async fn frames_before_auth_get_not_authenticated_then_auth_still_works() {
    let w = world().await;
    let mut raw = Raw::open(&w.node).await;
    raw.send_json(json!({"type": "heartbeat"})).await;
    assert_eq!(raw.error().await, err("not_authenticated", None));
    raw.send_json(json!({"type": "cursor", "pos": 1})).await;
    assert_eq!(raw.error().await, err("not_authenticated", None));
    raw.send_json(send_to("early", &w.bob.id, "before auth"))
        .await;
    let (code, _) = raw.error().await;
    assert_eq!(code, "not_authenticated");
    let ready = raw.auth(w.alice.api.token()).await;
    assert_eq!(ready["user"], w.alice.id.as_str());
    raw.still_sends(&w.bob.id).await;
    // Nothing sent before auth was stored.
    let history = w
        .bob
        .api
        .history(&w.direct, None, Some(200))
        .await
        .expect("history");
    assert!(
        history
            .events
            .iter()
            .all(|e| body_of(e) != Some("before auth"))
    );
    w.assert_intact().await;
}

// ---------------------------------------------------------------------------------
// 9-10: rate limits and slow readers.

#[tokio::test]
async fn frames_beyond_the_rate_limit_get_rate_limited_and_the_session_goes_on() {
    let w = world_with(|c| {
        c.rate_limit_per_sec = 5;
        c.rate_limit_burst = 5;
    })
    .await;
    let mut a = Raw::authed(&w.node, &w.alice).await;
    for _ in 0..20 {
        a.send_json(json!({"type": "heartbeat"})).await;
    }
    let keys: Vec<String> = (0..20).map(|i| format!("burst-{i}")).collect();
    for k in &keys {
        a.send_json(send_to(k, &w.bob.id, k)).await;
    }
    // Frames are handled in order: heartbeats are answered only when refused, and every
    // send gets exactly one answer, an ack or a refusal naming its key.
    let mut answers: HashMap<String, String> = HashMap::new();
    let mut heartbeats_refused = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while answers.len() < keys.len() {
        let f = a.frame_by(deadline).await;
        let answer = match f["type"].as_str() {
            Some("ack") => "ack".to_string(),
            Some("error") => {
                let (code, key) = error_parts(&f);
                assert_eq!(code, "rate_limited", "{f}");
                if key.is_none() {
                    assert!(answers.is_empty(), "heartbeats come first: {f}");
                    heartbeats_refused += 1;
                    continue;
                }
                code
            }
            _ => continue,
        };
        let key = f["key"]
            .as_str()
            .expect("answers name their key")
            .to_string();
        assert!(keys.contains(&key), "{f}");
        assert!(answers.insert(key, answer).is_none(), "one answer per send");
    }
    assert!(
        heartbeats_refused >= 1,
        "20 heartbeats at once exceed a burst of 5"
    );
    let limited: Vec<&String> = answers
        .iter()
        .filter(|(_, a)| *a == "rate_limited")
        .map(|(k, _)| k)
        .collect();
    assert!(!limited.is_empty(), "20 sends at once exceed a burst of 5");

    // Once the bucket refills, the same session sends again.
    let mut delivered = None;
    for attempt in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let key = format!("after-{attempt}");
        a.send_json(send_to(&key, &w.bob.id, "after the burst"))
            .await;
        let answer = a.answer(&key).await;
        if answer["type"] == "ack" {
            delivered = Some(answer);
            break;
        }
        assert_eq!(error_parts(&answer).0, "rate_limited");
    }
    assert!(delivered.is_some(), "the session recovers within 4 s");

    // Exactly the acknowledged sends were stored.
    let history = w
        .bob
        .api
        .history(&w.direct, None, Some(200))
        .await
        .expect("history");
    for (key, answer) in &answers {
        let stored = history
            .events
            .iter()
            .filter(|e| body_of(e) == Some(key.as_str()))
            .count();
        assert_eq!(stored, usize::from(answer == "ack"), "{key}: {answer}");
    }
    w.assert_intact().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_is_cut_off_without_slowing_others_and_resyncs() {
    const N: usize = 2000;
    /// Sends in flight at once; below session_queue, so no batch alone overflows a queue.
    const WINDOW: usize = 8;
    let node = TestNode::start_with(|c| c.session_queue = 16).await;
    let sender = node.user("sender").await;
    let slow = node.user("slow").await;
    let steady = node.user("steady").await;
    let group = sender
        .api
        .create_group("three", &[slow.id.clone(), steady.id.clone()])
        .await
        .expect("group");
    let body = |i: usize| format!("m{i:05} {}", "z".repeat(4000));
    let expected: Vec<String> = (0..N).map(body).collect();

    // The slow client authenticates, reads its backlog, and then never reads again.
    let mut slow_ws = Raw::open_small_window(&node).await;
    slow_ws.auth(slow.api.token()).await;

    // The steady reader reads all along, in its own task, and heartbeats like a real
    // client (a loaded machine may stretch this case past the 30 s heartbeat timeout).
    let steady_device = steady.connect().await;
    let reader = tokio::spawn(async move {
        let mut d = steady_device;
        let mut got = Vec::with_capacity(N);
        let mut beat = Instant::now();
        while got.len() < N {
            let (_, body) = d.message().await;
            got.push((body, Instant::now()));
            if beat.elapsed() > Duration::from_secs(5) {
                d.send_frame(&ClientFrame::Heartbeat).await;
                beat = Instant::now();
            }
        }
        got
    });

    // Pipelined sends, waiting for acks.
    let mut s = Raw::authed(&node, &sender).await;
    let mut acked_at: Vec<Option<Instant>> = vec![None; N];
    let (mut next, mut in_flight, mut acked) = (0, 0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked < N {
        while in_flight < WINDOW && next < N {
            let key = format!("slow-{next}");
            s.send_json(send_in(&key, &group.id, &body(next))).await;
            next += 1;
            in_flight += 1;
        }
        let f = match s.next_by(deadline).await {
            Next::Frame(f) => f,
            Next::Closed(code) => panic!(
                "the sender's session ended ({code:?}) after {acked} acks, although it reads \
                 everything as it comes"
            ),
        };
        match f["type"].as_str() {
            Some("ack") => {
                let i: usize = f["key"]
                    .as_str()
                    .and_then(|k| k.strip_prefix("slow-"))
                    .and_then(|k| k.parse().ok())
                    .expect("one of our keys");
                assert!(acked_at[i].replace(Instant::now()).is_none(), "acked once");
                in_flight -= 1;
                acked += 1;
            }
            Some("error") => panic!("send refused: {f}"),
            _ => {}
        }
    }

    // The steady reader got everything, in order, each within moments of its ack.
    let got = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the steady reader finishes in time")
        .expect("the steady reader's session stayed open");
    let bodies: Vec<&String> = got.iter().map(|(b, _)| b).collect();
    assert!(
        bodies.iter().copied().eq(expected.iter()),
        "all, once, in order"
    );
    let worst = got
        .iter()
        .zip(&acked_at)
        .map(|((_, at), ack)| at.saturating_duration_since(ack.expect("acked")))
        .max()
        .expect("some");
    // Far below the 10 s a write to the stuck client may block its own session.
    assert!(
        worst < Duration::from_secs(5),
        "the steady reader lagged {worst:?} behind an ack"
    );

    // The node noticed the slow client.
    let metrics = http()
        .get(format!("{}/metrics", node.url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let slow_disconnects: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hearth_slow_disconnects_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the slow_disconnects counter");
    assert!(slow_disconnects >= 1, "{metrics}");

    // Reading at last: what was buffered, then the end of the session.
    let mut live: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let end = loop {
        match slow_ws.next_by(deadline).await {
            Next::Frame(f) if f["type"] == "event" => live.push(
                f["event"]["content"]["body"]
                    .as_str()
                    .expect("a message")
                    .to_string(),
            ),
            Next::Frame(_) => {}
            Next::Closed(code) => break code,
        }
    };
    if let Some(code) = end {
        assert_eq!(code, close::TOO_SLOW);
    }
    assert!(
        live.len() < N,
        "the slow client was cut off, not served everything"
    );
    assert_eq!(
        live,
        expected[..live.len()],
        "what it got came once, in order"
    );

    // Reconnected, it gets everything from its cursor: all messages, once, in order.
    let back = slow.connect().await;
    let resynced: Vec<&str> = back.backlog.iter().filter_map(body_of).collect();
    assert!(
        resynced
            .iter()
            .copied()
            .eq(expected.iter().map(String::as_str))
    );

    // The node still serves, and the history holds every message once, in order.
    let health = http()
        .get(format!("{}/healthz", node.url()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    let mut stored: Vec<String> = Vec::new();
    let mut before: Option<String> = None;
    for _ in 0..=N / 200 + 1 {
        let page = steady
            .api
            .history(&group.id, before.as_deref(), Some(200))
            .await
            .expect("history");
        stored.extend(page.events.iter().filter_map(body_of).map(str::to_string));
        before = page.next;
        if before.is_none() {
            break;
        }
    }
    assert!(before.is_none(), "history ends");
    stored.reverse();
    assert!(
        stored == expected,
        "history holds every message once, in order"
    );
}

// ---------------------------------------------------------------------------------
// 11-13: membership, HTTP bodies and parameters, send validation.

#[tokio::test]
async fn non_members_are_refused_and_unknown_channels_are_named() {
    let w = world().await;
    let mallory = w.node.user("mallory").await;
    let group = w
        .alice
        .api
        .create_group("private", std::slice::from_ref(&w.bob.id))
        .await
        .expect("group");
    let mut a = Raw::authed(&w.node, &w.alice).await;
    let in_group = a.key();
    let group_first = a
        .send_acked(&in_group, send_in(&in_group, &group.id, "group secret"))
        .await;

    let mut m = Raw::authed(&w.node, &mallory).await;
    for channel in [group.id.as_str(), w.direct.as_str()] {
        let key = m.key();
        m.send_json(send_in(&key, channel, "let me in")).await;
        assert_eq!(m.error().await, err("not_member", Some(&key)));
        let res = http()
            .get(w.url(&format!("/v1/channels/{channel}/messages")))
            .header(AUTHORIZATION, format!("Bearer {}", mallory.api.token()))
            .send()
            .await
            .expect("answer");
        problem(res, 403, "not_member").await;
    }
    let unknown = "nosuchchannel@localhost";
    let key = m.key();
    m.send_json(send_in(&key, unknown, "anyone here?")).await;
    assert_eq!(m.error().await, err("unknown_channel", Some(&key)));
    let res = http()
        .get(w.url(&format!("/v1/channels/{unknown}/messages")))
        .header(AUTHORIZATION, format!("Bearer {}", mallory.api.token()))
        .send()
        .await
        .expect("answer");
    problem(res, 404, "unknown_channel").await;

    // Mallory's session goes on, and nothing of hers landed in either channel.
    m.still_sends(&w.bob.id).await;
    for channel in [&group.id, &w.direct] {
        let history = w
            .alice
            .api
            .history(channel, None, Some(200))
            .await
            .expect("history");
        assert!(history.events.iter().all(|e| e.sender != mallory.id));
    }
    let history = w
        .bob
        .api
        .history(&group.id, None, Some(200))
        .await
        .expect("history");
    assert_eq!(history.events[0].id, group_first);
    assert_eq!(body_of(&history.events[0]), Some("group secret"));
    w.assert_intact().await;
}

#[tokio::test]
async fn bad_http_bodies_routes_methods_and_parameters_get_problems() {
    let w = world().await;
    let json_post = |path: &str, body: String| {
        http()
            .post(w.url(path))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
    };
    for bad in [
        r#"{"username":"alice","password":"#.to_string(),
        "not json".to_string(),
        r#"{"username":5,"password":[]}"#.to_string(),
    ] {
        let res = json_post("/v1/login", bad).send().await.expect("answer");
        problem(res, 400, "bad_request").await;
    }
    let huge = format!(
        r#"{{"username":"alice","password":"{}"}}"#,
        "p".repeat(MAX_HTTP_BODY)
    );
    let res = json_post("/v1/login", huge).send().await.expect("answer");
    problem(res, 413, "too_large").await;

    let res = http()
        .get(w.url("/v1/no/such/route"))
        .send()
        .await
        .expect("answer");
    problem(res, 404, "not_found").await;
    for res in [
        http().get(w.url("/v1/login")),
        http().delete(w.url("/v1/me")),
    ] {
        let res = res.send().await.expect("answer");
        problem(res, 405, "method_not_allowed").await;
    }

    let bearer = format!("Bearer {}", w.alice.api.token());
    for query in [
        "limit=abc",
        "limit=-1",
        "limit=0",
        "limit=100000",
        "before=garbage",
        "before=",
    ] {
        let res = http()
            .get(w.url(&format!("/v1/channels/{}/messages?{query}", w.direct)))
            .header(AUTHORIZATION, &bearer)
            .send()
            .await
            .expect("answer");
        problem(res, 400, "invalid_field").await;
    }
    // And the good request beside them works.
    let res = http()
        .get(w.url(&format!("/v1/channels/{}/messages?limit=1", w.direct)))
        .header(AUTHORIZATION, &bearer)
        .send()
        .await
        .expect("answer");
    assert_eq!(res.status().as_u16(), 200);
    w.node
        .client()
        .login("alice", PASSWORD, None)
        .await
        .expect("login still works");
    w.assert_intact().await;
}

#[tokio::test]
async fn invalid_sends_are_refused_with_their_key_and_store_nothing() {
    let w = world().await;
    let mut a = Raw::authed(&w.node, &w.alice).await;
    let bob = w.bob.id.clone();
    let long_key = "k".repeat(65);
    let cases: Vec<(Value, &str, Option<&str>)> = vec![
        (send_to("empty", &bob, ""), "invalid_field", Some("empty")),
        (
            send_to("blank", &bob, " \n\t "),
            "invalid_field",
            Some("blank"),
        ),
        (
            send_to("big", &bob, &"b".repeat(MAX_BODY + 1)),
            "too_large",
            Some("big"),
        ),
        (
            json!({"type": "send", "key": "both", "to": bob, "channel": w.direct, "body": "x"}),
            "bad_request",
            Some("both"),
        ),
        (
            json!({"type": "send", "key": "neither", "body": "x"}),
            "bad_request",
            Some("neither"),
        ),
        (
            send_to("self", &w.alice.id, "me"),
            "invalid_recipient",
            Some("self"),
        ),
        (
            send_to("self-short", "alice", "me"),
            "invalid_recipient",
            Some("self-short"),
        ),
        (
            send_to("nobody", "nobody@localhost", "hi"),
            "unknown_user",
            Some("nobody"),
        ),
        (
            send_to(&long_key, &bob, "long key"),
            "invalid_field",
            Some(&long_key),
        ),
        (send_to("", &bob, "empty key"), "invalid_field", Some("")),
    ];
    for (frame, code, key) in &cases {
        a.send_json(frame.clone()).await;
        assert_eq!(a.error().await, err(code, *key), "for {frame}");
    }
    // The limits themselves are allowed.
    let max_key = "k".repeat(64);
    a.send_acked(&max_key, send_to(&max_key, &bob, "longest key"))
        .await;
    let max_body = "b".repeat(MAX_BODY);
    a.send_acked("max-body", send_to("max-body", &bob, &max_body))
        .await;

    // Only the earlier message and the two accepted ones are stored.
    let history = w
        .bob
        .api
        .history(&w.direct, None, Some(200))
        .await
        .expect("history");
    let bodies: Vec<&str> = history.events.iter().filter_map(body_of).collect();
    assert_eq!(bodies, vec![max_body.as_str(), "longest key", FIRST_BODY]);
    w.assert_intact().await;
}
