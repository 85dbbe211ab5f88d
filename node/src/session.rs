//! One device's WebSocket session: authentication, backlog, live events, sends, heartbeats.
//!
//! The session is one task over a transport of text frames, generic so tests can
//! drive it without sockets. It attaches to the hub before reading the backlog,
//! so nothing published meanwhile is missed, and drops anything at or below the
//! position it already sent, so nothing arrives twice.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use hearth_client_api::{ClientFrame, ErrorCode, PROTOCOL_VERSION, ServerFrame, close};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, debug, info};

use crate::Services;
use crate::accounts::DeviceAuth;
use crate::channels::{Ack, Target};
use crate::error::ApiError;
use crate::hub::{Attachment, Mailbox, Outbound, Wake};

/// A frame from the client, as the transport saw it.
#[derive(Debug)]
pub enum WireIn {
    /// A text frame.
    Text(String),
    /// A binary frame (not part of the protocol).
    Binary,
    /// A frame beyond the transport's hard size cap; the connection cannot go on.
    TooBig,
    /// The client sent a close frame; it gets one back.
    CloseRequested,
    /// The connection broke or ended without a close frame.
    Closed,
}

/// A frame to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum WireOut {
    /// A text frame.
    Text(Arc<str>),
    /// Close with a code and reason.
    Close(u16, String),
}

/// How long one write may take before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sends one session may have waiting for their flush.
const MAX_SENDS_IN_FLIGHT: usize = 256;
/// Queued items written per socket flush.
const WRITE_BATCH: usize = 64;

type SendResult = (String, Result<Ack, ApiError>);
type PendingSend = Pin<Box<dyn Future<Output = SendResult> + Send>>;

enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The connection is gone; nothing more to write.
    Gone,
    /// The client closed: the transport's queued reply (an echo of the client's close)
    /// goes out with a flush.
    Echo,
}

fn encode(frame: &ServerFrame) -> Arc<str> {
    Arc::from(serde_json::to_string(frame).unwrap_or_default())
}

fn error_frame(code: ErrorCode, message: impl Into<String>, key: Option<String>) -> WireOut {
    WireOut::Text(encode(&ServerFrame::Error {
        code,
        message: message.into(),
        key,
    }))
}

const KNOWN_FRAMES: &[&str] = &["auth", "send", "cursor", "heartbeat"];

/// Parses a client frame, telling unknown types apart from malformed frames.
fn parse(text: &str) -> Result<ClientFrame, (ErrorCode, String)> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        (
            ErrorCode::BadRequest,
            format!("the frame is not valid JSON: {e}"),
        )
    })?;
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or((
            ErrorCode::BadRequest,
            "a frame is a JSON object with a string field \"type\"".to_string(),
        ))?
        .to_string();
    if !KNOWN_FRAMES.contains(&kind.as_str()) {
        return Err((
            ErrorCode::UnknownFrame,
            format!("unknown frame type {kind:?}; known types are {KNOWN_FRAMES:?}"),
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        (
            ErrorCode::BadRequest,
            format!("malformed {kind} frame: {e}"),
        )
    })
}

async fn write<T>(t: &mut T, out: WireOut) -> Result<(), End>
where
    T: Sink<WireOut> + Unpin,
{
    match timeout(WRITE_TIMEOUT, t.send(out)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(End::Gone),
    }
}

/// Runs a session to its end over `transport`.
///
/// Not an `async fn`: the future of one keeps its arguments twice (as captured and
/// as moved into the body), and the transport is the largest thing a session holds
/// for as long as the connection lives.
#[allow(clippy::manual_async_fn)]
pub fn run<T>(mut transport: T, svc: Arc<Services>) -> impl Future<Output = ()>
where
    T: Stream<Item = WireIn> + Sink<WireOut> + Unpin,
{
    async move {
        // Boxed, like the other phases that come once: the session's future is as
        // large as its largest state, so only the idle wait should be in it.
        let Some(auth) = Box::pin(authenticate(&mut transport, &svc)).await else {
            return;
        };
        let end = serve(&mut transport, &svc, &auth).await;
        finish(&mut transport, end).await;
    }
}

/// Waits for the `auth` frame; closes the connection and returns None if it does not come.
async fn authenticate<T>(t: &mut T, svc: &Services) -> Option<DeviceAuth>
where
    T: Stream<Item = WireIn> + Sink<WireOut> + Unpin,
{
    let deadline = Instant::now() + Duration::from_secs(svc.config.auth_timeout_secs);
    let end = loop {
        let frame = tokio::select! {
            f = t.next() => f.unwrap_or(WireIn::Closed),
            _ = sleep_until(deadline) => break End::Close(close::AUTH_TIMEOUT, "no auth frame in time"),
        };
        let text = match frame {
            WireIn::Text(text) => text,
            WireIn::Closed => break End::Gone,
            WireIn::CloseRequested => break End::Echo,
            WireIn::TooBig => break End::Close(close::MESSAGE_TOO_BIG, "frame too large"),
            WireIn::Binary => {
                let e = error_frame(
                    ErrorCode::BadRequest,
                    "binary frames are not part of the protocol",
                    None,
                );
                if write(t, e).await.is_err() {
                    break End::Gone;
                }
                continue;
            }
        };
        match parse(&text) {
            Ok(ClientFrame::Auth { v, token }) => {
                if v != PROTOCOL_VERSION {
                    let e = error_frame(
                        ErrorCode::UnsupportedVersion,
                        format!("this server speaks protocol version {PROTOCOL_VERSION}, not {v}"),
                        None,
                    );
                    let _ = write(t, e).await;
                    break End::Close(close::UNSUPPORTED_VERSION, "unsupported protocol version");
                }
                match svc.accounts.authenticate(&token) {
                    Ok(auth) => return Some(auth),
                    Err(err) => {
                        let _ = write(t, error_frame(err.code, err.message, None)).await;
                        break End::Close(close::UNAUTHORIZED, "unauthorized");
                    }
                }
            }
            Ok(_) => {
                let e = error_frame(
                    ErrorCode::NotAuthenticated,
                    "send an auth frame first",
                    None,
                );
                if write(t, e).await.is_err() {
                    break End::Gone;
                }
            }
            Err((code, message)) => {
                if write(t, error_frame(code, message, None)).await.is_err() {
                    break End::Gone;
                }
            }
        }
    };
    debug!("session closed before authenticating");
    finish(t, end).await;
    None
}

/// Ends a session on the wire: a close frame, or the echo of the client's close.
async fn finish<T>(t: &mut T, end: End)
where
    T: Sink<WireOut> + Unpin,
{
    match end {
        End::Close(code, reason) => {
            let _ = timeout(
                WRITE_TIMEOUT,
                t.send(WireOut::Close(code, reason.to_string())),
            )
            .await;
        }
        End::Echo => {
            let _ = timeout(WRITE_TIMEOUT, t.flush()).await;
        }
        End::Gone => {}
    }
}

/// The authenticated part of a session.
///
/// Not `async fn`s, this and `session_loop`: an async fn's future stores each
/// argument twice, and these futures are held for the whole connection.
fn serve<'a, T>(
    t: &'a mut T,
    svc: &'a Services,
    auth: &'a DeviceAuth,
) -> impl Future<Output = End> + 'a
where
    T: Stream<Item = WireIn> + Sink<WireOut> + Unpin,
{
    let span = tracing::info_span!("serve", user = %auth.user, device = %auth.device);
    async move {
        let cursor = match svc.accounts.cursor(auth) {
            Ok(c) => c,
            Err(_) => return End::Close(close::LOGGED_OUT, "logged out"),
        };
        let attachment = svc
            .hub
            .attach(&auth.user, &auth.device, heartbeat_timeout(svc));
        // A logout between reading the cursor and attaching kicked nobody: check again.
        if svc.accounts.cursor(auth).is_err() {
            attachment.detach(&auth.user);
            return End::Close(close::LOGGED_OUT, "logged out");
        }
        svc.presence.touch(&auth.user);
        if attachment.first {
            svc.presence.announce(&auth.user);
        }
        info!(cursor, "session started");
        let end = session_loop(t, svc, auth, cursor, &attachment).await;
        svc.presence.touch(&auth.user);
        if attachment.detach(&auth.user) {
            svc.presence.announce(&auth.user);
        }
        info!("session ended");
        end
    }
    .instrument(span)
}

// Not an async fn, for the reason given at `serve`.
#[allow(clippy::manual_async_fn)]
fn session_loop<'a, T>(
    t: &'a mut T,
    svc: &'a Services,
    auth: &'a DeviceAuth,
    cursor: u64,
    attachment: &'a Attachment,
) -> impl Future<Output = End> + 'a
where
    T: Stream<Item = WireIn> + Sink<WireOut> + Unpin,
{
    async move {
        let cfg = &svc.config;
        let ready = encode(&ServerFrame::Ready {
            v: PROTOCOL_VERSION,
            user: auth.user.clone(),
            device: auth.device.clone(),
            cursor,
            heartbeat_timeout_ms: heartbeat_timeout(svc).as_millis() as u64,
            max_frame_bytes: cfg.max_frame_bytes,
        });
        if let Err(e) = Box::pin(write(t, WireOut::Text(ready))).await {
            return e;
        }
        let mailbox = &attachment.mailbox;
        let mut limit = FrameLimit::default();
        let mut sent_upto = cursor;
        let mut backlog_done = false;
        // Created with the first send and dropped when none wait: an empty
        // FuturesUnordered still holds two allocations.
        let mut sends: Option<FuturesUnordered<PendingSend>> = None;
        loop {
            if sends.as_ref().is_some_and(FuturesUnordered::is_empty) {
                sends = None;
            }
            // Shutdown comes as a kick and the heartbeat deadline as a wake-up from the
            // hub: a session holds neither a timer nor a shutdown waiter while it idles.
            tokio::select! {
                biased;
                // Outgoing events first: a client that sends a lot must still receive its
                // own and others' events, or its queue overflows while it is reading.
                // Items wait until the backlog is sent; a kick is taken at any time.
                wake = mailbox.wait(backlog_done) => match wake {
                    Wake::Kicked(code) => return End::Close(code, kick_reason(code)),
                    Wake::Items => {
                        if let Err(e) = Box::pin(write_live(t, svc, mailbox, &mut sent_upto, &mut sends)).await {
                            return e;
                        }
                    }
                },
                Some(done) = next_send(&mut sends), if sends.is_some() => {
                    if let Err(e) = Box::pin(write_answers(t, svc, done, &mut sends)).await {
                        return e;
                    }
                }
                frame = t.next() => {
                    attachment.heard(heartbeat_timeout(svc));
                    svc.metrics.frames_in.inc();
                    let text = match frame.unwrap_or(WireIn::Closed) {
                        WireIn::Text(text) => text,
                        WireIn::Closed => return End::Gone,
                        WireIn::CloseRequested => return End::Echo,
                        WireIn::TooBig => return End::Close(close::MESSAGE_TOO_BIG, "frame too large"),
                        WireIn::Binary => {
                            let e = error_frame(ErrorCode::BadRequest, "binary frames are not part of the protocol", None);
                            if let Err(e) = Box::pin(out(t, svc, e)).await { return e; }
                            continue;
                        }
                    };
                    if text.len() > cfg.max_frame_bytes {
                        let e = error_frame(
                            ErrorCode::TooLarge,
                            format!("the frame is {} bytes; at most {} are accepted", text.len(), cfg.max_frame_bytes),
                            None,
                        );
                        if let Err(e) = Box::pin(out(t, svc, e)).await { return e; }
                        continue;
                    }
                    if !limit.check(cfg.rate_limit_per_sec, cfg.rate_limit_burst) {
                        let key = serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| v.get("key").and_then(|k| k.as_str()).map(str::to_string));
                        let e = error_frame(ErrorCode::RateLimited, "too many frames; slow down and resend", key);
                        if let Err(e) = Box::pin(out(t, svc, e)).await { return e; }
                        continue;
                    }
                    let reply = match parse(&text) {
                        Err((code, message)) => Some(error_frame(code, message, None)),
                        Ok(ClientFrame::Heartbeat) => {
                            svc.presence.touch(&auth.user);
                            None
                        }
                        Ok(ClientFrame::Auth { .. }) => Some(error_frame(
                            ErrorCode::BadRequest,
                            "this session is already authenticated",
                            None,
                        )),
                        Ok(ClientFrame::Cursor { pos }) => {
                            // A device cannot acknowledge what it has not been sent.
                            match svc.accounts.advance_cursor(auth, pos.min(sent_upto)) {
                                Ok(()) => None,
                                Err(err) => Some(error_frame(err.code, err.message, None)),
                            }
                        }
                        Ok(ClientFrame::Send { key, to, channel, body }) => {
                            let target = match (to, channel) {
                                (Some(user), None) => Ok(Target::User(user)),
                                (None, Some(channel)) => Ok(Target::Channel(channel)),
                                _ => Err("a send names exactly one of \"to\" and \"channel\""),
                            };
                            match target {
                                Err(m) => Some(error_frame(ErrorCode::BadRequest, m, Some(key))),
                                Ok(_) if sends.as_ref().map_or(0, FuturesUnordered::len) >= MAX_SENDS_IN_FLIGHT => Some(error_frame(
                                    ErrorCode::RateLimited,
                                    "too many sends waiting for their acks; wait for some",
                                    Some(key),
                                )),
                                Ok(target) => {
                                    let channels = svc.channels.clone();
                                    let auth = auth.clone();
                                    sends.get_or_insert_with(FuturesUnordered::new).push(Box::pin(async move {
                                        let res = channels.send(&auth, &key, target, &body).await;
                                        (key, res)
                                    }));
                                    None
                                }
                            }
                        }
                    };
                    if let Some(reply) = reply
                        && let Err(e) = Box::pin(out(t, svc, reply)).await { return e; }
                }
                // Last but one: frames that already arrived count. No waker of its
                // own: the hub's sweeper wakes the session (through its mailbox)
                // once the deadline has passed.
                _ = std::future::poll_fn(|_| {
                    if attachment.timed_out() { Poll::Ready(()) } else { Poll::Pending }
                }) => {
                    return End::Close(close::HEARTBEAT_TIMEOUT, "no heartbeat in time");
                }
                _ = std::future::ready(()), if !backlog_done => {
                    match svc.inboxes.backlog(&auth.user, sent_upto, cfg.sync_batch) {
                        Ok(mut events) => {
                            let mut more = events.len() == cfg.sync_batch;
                            // Keep each frame within the frame limit: large messages make
                            // smaller batches, never a frame the transport cannot carry.
                            let mut size = 0;
                            let fit = events
                                .iter()
                                .position(|e| {
                                    size += serde_json::to_string(e).map_or(0, |s| s.len() + 1);
                                    size > cfg.max_frame_bytes
                                })
                                .map_or(events.len(), |i| i.max(1));
                            if fit < events.len() {
                                events.truncate(fit);
                                more = true;
                            }
                            if let Some(pos) = events.last().and_then(|e| e.pos) {
                                sent_upto = pos;
                            }
                            backlog_done = !more;
                            let frame = encode(&ServerFrame::Sync { events, more });
                            if let Err(e) = Box::pin(out(t, svc, WireOut::Text(frame))).await {
                                return e;
                            }
                        }
                        Err(_) => return End::Close(close::SERVER_ERROR, "server error"),
                    }
                }
            }
        }
    }
}

fn heartbeat_timeout(svc: &Services) -> Duration {
    Duration::from_secs(svc.config.heartbeat_timeout_secs)
}

/// The per-session frame limit: `per_sec` frames a second sustained, bursts of
/// `burst`. The GCRA that governor implements, kept here as one instant because a
/// session holds it for its whole life: 16 bytes instead of governor's 72 (a
/// limiter carries its own clock and quota).
#[derive(Default)]
struct FrameLimit {
    /// The theoretical arrival time of the next frame; None before the first.
    tat: Option<std::time::Instant>,
}

impl FrameLimit {
    /// Counts a frame; false if it is over the limit (and then it is not counted).
    fn check(&mut self, per_sec: u32, burst: u32) -> bool {
        let now = std::time::Instant::now();
        // One frame's share of a second, and the credit a burst may draw ahead.
        let t = (Duration::from_secs(1) / per_sec.max(1)).max(Duration::from_nanos(1));
        let tau = t * (burst.max(1) - 1);
        let tat = self.tat.unwrap_or(now);
        if tat.checked_sub(tau).is_some_and(|earliest| now < earliest) {
            return false;
        }
        self.tat = Some(tat.max(now) + t);
        true
    }
}

fn kick_reason(code: u16) -> &'static str {
    match code {
        close::TOO_SLOW => "too slow: reconnect and resync from your cursor",
        close::GOING_AWAY => "server shutting down",
        close::LOGGED_OUT => "logged out",
        _ => "closed by the server",
    }
}

async fn out<T>(t: &mut T, svc: &Services, frame: WireOut) -> Result<(), End>
where
    T: Sink<WireOut> + Unpin,
{
    svc.metrics.frames_out.inc();
    write(t, frame).await
}

/// The next finished send, if any are waiting (the select arm is off when none are).
async fn next_send(sends: &mut Option<FuturesUnordered<PendingSend>>) -> Option<SendResult> {
    sends.as_mut()?.next().await
}

/// The frame that answers a finished send: its ack, or why it failed.
fn answer_frame((key, result): SendResult) -> WireOut {
    match result {
        Ok(ack) => WireOut::Text(encode(&ServerFrame::Ack {
            key,
            event_id: ack.event_id,
            channel: ack.channel,
            ts: ack.ts,
        })),
        Err(err) => error_frame(err.code, err.message, Some(key)),
    }
}

/// Feeds the answers of the sends that have finished by now, without waiting for
/// more. The flusher settles a round's acks just after it publishes the round's
/// events, so a sender's ack and its own copy of the event usually leave in one
/// socket write instead of two.
async fn feed_finished_sends<T>(
    t: &mut T,
    svc: &Services,
    sends: &mut Option<FuturesUnordered<PendingSend>>,
) -> Result<(), End>
where
    T: Sink<WireOut> + Unpin,
{
    let Some(pending) = sends.as_mut() else {
        return Ok(());
    };
    while let Some(Some(done)) = pending.next().now_or_never() {
        feed(t, svc, answer_frame(done)).await?;
    }
    Ok(())
}

/// Queues a frame in the transport's write buffer; [`flush`] sends what is queued.
async fn feed<T>(t: &mut T, svc: &Services, frame: WireOut) -> Result<(), End>
where
    T: Sink<WireOut> + Unpin,
{
    svc.metrics.frames_out.inc();
    match timeout(WRITE_TIMEOUT, t.feed(frame)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(End::Gone),
    }
}

/// Sends what [`feed`] queued.
async fn flush<T>(t: &mut T) -> Result<(), End>
where
    T: Sink<WireOut> + Unpin,
{
    match timeout(WRITE_TIMEOUT, t.flush()).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(End::Gone),
    }
}

/// Writes a finished send's answer and any others finished by now, with one flush.
async fn write_answers<T>(
    t: &mut T,
    svc: &Services,
    done: SendResult,
    sends: &mut Option<FuturesUnordered<PendingSend>>,
) -> Result<(), End>
where
    T: Sink<WireOut> + Unpin,
{
    feed(t, svc, answer_frame(done)).await?;
    feed_finished_sends(t, svc, sends).await?;
    flush(t).await
}

/// Writes the queued items, up to a batch, and the answers of sends finished by
/// then, with one flush.
async fn write_live<T>(
    t: &mut T,
    svc: &Services,
    mailbox: &Mailbox,
    sent_upto: &mut u64,
    sends: &mut Option<FuturesUnordered<PendingSend>>,
) -> Result<(), End>
where
    T: Sink<WireOut> + Unpin,
{
    let mut item = mailbox.pop();
    let mut written = 0;
    let mut accepted = Vec::new();
    while let Some(next) = item.take() {
        let frame = match next {
            Outbound::Event {
                pos,
                frame,
                accepted_at,
            } => {
                if pos <= *sent_upto {
                    // Already sent in the backlog.
                    None
                } else {
                    *sent_upto = pos;
                    accepted.push(accepted_at);
                    Some(frame)
                }
            }
            Outbound::Presence(frame) => Some(frame),
        };
        if let Some(frame) = frame {
            feed(t, svc, WireOut::Text(frame)).await?;
            written += 1;
        }
        if written < WRITE_BATCH {
            item = mailbox.pop();
        }
    }
    feed_finished_sends(t, svc, sends).await?;
    flush(t).await?;
    for at in accepted {
        svc.metrics
            .delivery_seconds
            .observe(at.elapsed().as_secs_f64());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll};
    use tokio::sync::mpsc as chan;

    /// An in-memory transport: the test plays the client on the other ends.
    struct Pipe {
        from_client: chan::UnboundedReceiver<WireIn>,
        to_client: chan::UnboundedSender<WireOut>,
        /// Flushes so far: each would be one socket write on a real transport.
        flushes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Stream for Pipe {
        type Item = WireIn;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WireIn>> {
            self.from_client.poll_recv(cx)
        }
    }

    impl Sink<WireOut> for Pipe {
        type Error = chan::error::SendError<WireOut>;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, item: WireOut) -> Result<(), Self::Error> {
            self.to_client.send(item)
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Client {
        tx: chan::UnboundedSender<WireIn>,
        rx: chan::UnboundedReceiver<WireOut>,
    }

    impl Client {
        fn say(&self, frame: &str) {
            self.tx
                .send(WireIn::Text(frame.into()))
                .expect("session alive");
        }
        async fn hear(&mut self) -> WireOut {
            self.rx.recv().await.expect("session wrote something")
        }
    }

    async fn services(dir: &std::path::Path) -> (Arc<Services>, crate::Node) {
        let config = crate::Config {
            data_dir: dir.to_path_buf(),
            ..crate::Config::default()
        };
        let node = crate::Node::open(config).await.expect("node");
        (node.services().clone(), node)
    }

    fn session(svc: Arc<Services>) -> Client {
        let (tx, from_client) = chan::unbounded_channel();
        let (to_client, rx) = chan::unbounded_channel();
        tokio::spawn(run(
            Pipe {
                from_client,
                to_client,
                flushes: Arc::default(),
            },
            svc,
        ));
        Client { tx, rx }
    }

    #[tokio::test]
    async fn a_client_that_never_authenticates_is_closed_after_the_auth_timeout() {
        let dir = tempfile::tempdir().expect("dir");
        let (svc, _node) = services(dir.path()).await;
        tokio::time::pause();
        let mut client = session(svc);
        assert_eq!(
            client.hear().await,
            WireOut::Close(close::AUTH_TIMEOUT, "no auth frame in time".into())
        );
    }

    #[tokio::test]
    async fn a_silent_session_is_closed_after_the_heartbeat_timeout_and_heartbeats_keep_it() {
        let dir = tempfile::tempdir().expect("dir");
        let (svc, _node) = services(dir.path()).await;
        svc.accounts
            .create_account("alice", "a long password", false)
            .await
            .expect("account");
        let login = svc
            .accounts
            .login("alice", "a long password", None)
            .await
            .expect("login");
        let mut client = session(svc);
        client.say(&format!(
            r#"{{"type":"auth","v":1,"token":"{}"}}"#,
            login.token
        ));
        let WireOut::Text(ready) = client.hear().await else {
            panic!("ready expected")
        };
        assert!(ready.contains(r#""type":"ready""#));
        let WireOut::Text(sync) = client.hear().await else {
            panic!("sync expected")
        };
        assert!(sync.contains(r#""more":false"#));
        tokio::time::pause();
        // 20 s apart, within the 30 s timeout: still open after a minute.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(20)).await;
            client.say(r#"{"type":"heartbeat"}"#);
        }
        tokio::task::yield_now().await;
        assert!(
            client.rx.try_recv().is_err(),
            "nothing written, nothing closed"
        );
        assert_eq!(
            client.hear().await,
            WireOut::Close(close::HEARTBEAT_TIMEOUT, "no heartbeat in time".into())
        );
    }

    fn finished_send(key: &str) -> PendingSend {
        let ack = Ack {
            event_id: format!("$event-{key}"),
            channel: "!c@localhost".into(),
            ts: 1,
        };
        let key = key.to_string();
        Box::pin(async move { (key, Ok(ack)) })
    }

    #[tokio::test]
    async fn queued_events_and_the_acks_finished_by_then_leave_with_one_flush() {
        let dir = tempfile::tempdir().expect("dir");
        let (svc, _node) = services(dir.path()).await;
        let attachment = svc
            .hub
            .attach("alice@localhost", "phone", Duration::from_secs(30));
        svc.hub.send_to_user(
            "alice@localhost",
            &Outbound::Presence(Arc::from(r#"{"type":"presence"}"#)),
        );
        let (_tx, from_client) = chan::unbounded_channel();
        let (to_client, mut rx) = chan::unbounded_channel();
        let flushes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut pipe = Pipe {
            from_client,
            to_client,
            flushes: flushes.clone(),
        };
        let mut sends = Some(FuturesUnordered::from_iter([
            finished_send("k1"),
            finished_send("k2"),
        ]));
        let mut sent_upto = 0;
        write_live(
            &mut pipe,
            &svc,
            &attachment.mailbox,
            &mut sent_upto,
            &mut sends,
        )
        .await
        .unwrap_or_else(|_| panic!("the pipe took every frame"));
        let mut frames = Vec::new();
        while let Ok(WireOut::Text(text)) = rx.try_recv() {
            frames.push(text);
        }
        assert_eq!(
            frames.len(),
            3,
            "the presence frame and both acks: {frames:?}"
        );
        assert!(frames[0].contains("presence"));
        assert!(frames[1..].iter().all(|f| f.contains(r#""type":"ack""#)));
        assert_eq!(flushes.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(sends.as_ref().is_some_and(FuturesUnordered::is_empty));

        // An ack written on its own takes the other acks finished by then along.
        let mut sends = Some(FuturesUnordered::from_iter([finished_send("k4")]));
        write_answers(
            &mut pipe,
            &svc,
            (
                "k3".into(),
                Err(ApiError::new(
                    ErrorCode::Internal,
                    "the server failed; try again",
                )),
            ),
            &mut sends,
        )
        .await
        .unwrap_or_else(|_| panic!("the pipe took every frame"));
        let first = rx.try_recv().expect("the error frame");
        let second = rx.try_recv().expect("the other ack");
        assert!(
            matches!(first, WireOut::Text(t) if t.contains(r#""key":"k3""#) && t.contains("error"))
        );
        assert!(matches!(second, WireOut::Text(t) if t.contains(r#""key":"k4""#)));
        assert_eq!(flushes.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn the_frame_limit_allows_a_burst_then_the_sustained_rate() {
        let mut limit = FrameLimit::default();
        for _ in 0..5 {
            assert!(limit.check(1000, 5));
        }
        assert!(!limit.check(1000, 5), "the sixth frame of the burst");
        std::thread::sleep(Duration::from_millis(3));
        assert!(limit.check(1000, 5), "a frame's share came back");
        let mut strict = FrameLimit::default();
        assert!(strict.check(0, 0), "zero counts as one");
        assert!(!strict.check(0, 0));
    }

    #[test]
    fn unknown_types_and_malformed_frames_are_told_apart() {
        assert_eq!(
            parse(r#"{"type":"dance"}"#).map_err(|e| e.0),
            Err(ErrorCode::UnknownFrame)
        );
        assert_eq!(parse("{nope").map_err(|e| e.0), Err(ErrorCode::BadRequest));
        assert_eq!(
            parse(r#"{"type":"send","key":"k"}"#).map_err(|e| e.0),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            parse(r#"[1,2]"#).map_err(|e| e.0),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(parse(r#"{"type":"heartbeat"}"#), Ok(ClientFrame::Heartbeat));
    }
}
