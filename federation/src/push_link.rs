//! Requests over one long-lived stream per peer (the push link): its frames, the sending side, and the answering loop.
//!
//! A push used to be a request-response exchange: a new substream, a timer, and two
//! trips through the swarm task on each side for every push. On a link the sender's
//! task writes the frame to the stream itself and reads the answers in order, and
//! the receiver answers from a task of its own; the swarm is involved only when a
//! link opens. Each frame is a 4-byte big-endian length, then the CBOR of a
//! [`FedRequest`] (one way) or a [`FedResponse`] (the other), answered in the order
//! asked.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_util::stream::{FuturesOrdered, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::network::{IncomingLink, NetworkError};
use crate::protocol::{FedRequest, FedResponse, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};

/// The push link's protocol name.
pub const PUSH_PROTOCOL: &str = "/hearth/push/1";

/// Requests a sender may have written and not yet had answered on one link; more
/// wait for room. The outbox keeps 4 pushes in flight per server.
const LINK_IN_FLIGHT: usize = 16;

/// What the answering side does with one request.
pub type Answer = Pin<Box<dyn Future<Output = FedResponse> + Send + 'static>>;

type Reply = oneshot::Sender<Result<FedResponse, NetworkError>>;

/// Writes one frame; `buf` is reused between frames.
async fn write_frame<W, T>(w: &mut W, value: &T, buf: &mut Vec<u8>) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    let mut body = cbor4ii::serde::to_vec(std::mem::take(buf), value)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let len = u32::try_from(body.len() - 4)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    body[..4].copy_from_slice(&len.to_be_bytes());
    let written = w.write_all(&body).await;
    *buf = body;
    written?;
    w.flush().await
}

/// Reads one frame of at most `max` bytes; `None` when the stream ends between frames.
async fn read_frame<R, T>(r: &mut R, max: u64, buf: &mut Vec<u8>) -> io::Result<Option<T>>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = u64::from(u32::from_be_bytes(len));
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes; at most {max} are taken"),
        ));
    }
    // Read as the bytes come rather than allocating what the header claims: a
    // peer cannot make this server hold memory it has not sent.
    buf.clear();
    r.take(len).read_to_end(buf).await?;
    if (buf.len() as u64) < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    cbor4ii::serde::from_slice(buf)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// One open link: where its requests go, and which link it is (a link that ended
/// removes itself only if it was not replaced meanwhile).
#[derive(Clone)]
struct LinkHandle {
    id: u64,
    requests: mpsc::Sender<(FedRequest, Reply)>,
}

/// The sending side: one link per peer, opened on first use and again after it ends.
pub(crate) struct PushLinks {
    control: libp2p_stream::Control,
    links: Mutex<HashMap<PeerId, LinkHandle>>,
    next_id: std::sync::atomic::AtomicU64,
    timeout: Duration,
}

impl PushLinks {
    pub(crate) fn new(control: libp2p_stream::Control, timeout: Duration) -> Arc<Self> {
        Arc::new(PushLinks {
            control,
            links: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
            timeout,
        })
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, LinkHandle>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request` to `peer` on its link and waits for the answer.
    pub(crate) async fn request(
        self: &Arc<Self>,
        peer: PeerId,
        request: FedRequest,
    ) -> Result<FedResponse, NetworkError> {
        let failed = |reason: String| NetworkError::Request { peer, reason };
        let existing = self.links().get(&peer).cloned();
        let link = match existing {
            Some(link) => link,
            None => self.open(peer).await?,
        };
        let (reply, answer) = oneshot::channel();
        if link.requests.send((request, reply)).await.is_err() {
            self.forget(peer, link.id);
            return Err(failed("the push link closed".into()));
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(failed("the push link closed".into())),
            Err(_) => {
                // A link that does not answer in time is dropped: the next push opens
                // a fresh one rather than queueing behind a stuck peer.
                self.forget(peer, link.id);
                Err(failed("timed out".into()))
            }
        }
    }

    fn forget(&self, peer: PeerId, id: u64) {
        let mut links = self.links();
        if links.get(&peer).is_some_and(|l| l.id == id) {
            links.remove(&peer);
        }
    }

    async fn open(self: &Arc<Self>, peer: PeerId) -> Result<LinkHandle, NetworkError> {
        let stream = self
            .control
            .clone()
            .open_stream(peer, StreamProtocol::new(PUSH_PROTOCOL))
            .await
            .map_err(|e| NetworkError::Request {
                peer,
                reason: e.to_string(),
            })?;
        let (requests, queue) = mpsc::channel(LINK_IN_FLIGHT);
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let link = LinkHandle { id, requests };
        // Two pushes may have opened a link at once: the first one kept serves both.
        let kept = self.links().entry(peer).or_insert(link.clone()).clone();
        if kept.id == id {
            debug!(%peer, "push link opened");
            let links = self.clone();
            tokio::spawn(async move {
                run_link(stream, queue).await;
                links.forget(peer, id);
                debug!(%peer, "push link closed");
            });
        }
        Ok(kept)
    }
}

/// Writes requests as they come and hands out answers in order, until the stream
/// fails, the peer closes it, or every handle to the link is gone.
async fn run_link(stream: Stream, mut queue: mpsc::Receiver<(FedRequest, Reply)>) {
    let (mut reader, mut writer) = stream.split();
    let waiting: Mutex<VecDeque<Reply>> = Mutex::new(VecDeque::new());
    let write = async {
        let mut buf = Vec::new();
        while let Some((request, reply)) = queue.recv().await {
            // Queued before the write, so an answer can never find no one waiting.
            waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(reply);
            if let Err(e) = write_frame(&mut writer, &request, &mut buf).await {
                debug!(error = %e, "push link write failed");
                return;
            }
        }
    };
    let read = async {
        let mut buf = Vec::new();
        loop {
            let answer =
                match read_frame::<_, FedResponse>(&mut reader, MAX_RESPONSE_BYTES, &mut buf).await
                {
                    Ok(Some(answer)) => answer,
                    Ok(None) => return,
                    Err(e) => {
                        debug!(error = %e, "push link read failed");
                        return;
                    }
                };
            let reply = waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            match reply {
                Some(reply) => {
                    let _ = reply.send(Ok(answer));
                }
                None => {
                    debug!("push link answered what was not asked");
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = write => {}
        _ = read => {}
    }
    // Whoever still waits hears that the link is gone (by the dropped sender).
}

/// One request being answered in a task of its own, so that the answers to one link
/// use every core (verifying a push's signatures is most of its cost). Dropping it
/// (the link ended, the node stops) stops the answer.
struct Answering(tokio::task::JoinHandle<FedResponse>);

impl Future for Answering {
    type Output = FedResponse;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<FedResponse> {
        Pin::new(&mut self.0).poll(cx).map(|done| {
            done.unwrap_or_else(|e| FedResponse::Refused {
                code: "internal".into(),
                message: format!("the request was not answered: {e}"),
            })
        })
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Answers the requests arriving on one incoming link with `answer`, several at once,
/// writing the answers back in the order they were asked. Ends when the peer closes
/// the link or breaks the framing.
pub async fn serve_link<F>(link: IncomingLink, answer: F)
where
    F: Fn(FedRequest) -> Answer,
{
    let IncomingLink {
        peer,
        stream,
        _open,
    } = link;
    let (mut reader, mut writer) = stream.split();
    let (asked, mut to_answer) = mpsc::channel::<Answering>(LINK_IN_FLIGHT);
    let read = async move {
        let mut buf = Vec::new();
        loop {
            match read_frame::<_, FedRequest>(&mut reader, MAX_REQUEST_BYTES, &mut buf).await {
                Ok(Some(request)) => {
                    let answering = Answering(tokio::spawn(answer(request)));
                    if asked.send(answering).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    debug!(%peer, error = %e, "push link from peer broke");
                    return;
                }
            }
        }
    };
    let write = async move {
        let mut in_flight: FuturesOrdered<Answering> = FuturesOrdered::new();
        let mut buf = Vec::new();
        let mut reading = true;
        loop {
            tokio::select! {
                next = to_answer.recv(), if reading && in_flight.len() < LINK_IN_FLIGHT => match next {
                    Some(answer) => in_flight.push_back(answer),
                    None => reading = false,
                },
                Some(response) = in_flight.next() => {
                    if let Err(e) = write_frame(&mut writer, &response, &mut buf).await {
                        debug!(%peer, error = %e, "push link answer not written");
                        return;
                    }
                }
                else => break,
            }
        }
        let _ = writer.close().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::identity::NodeIdentity;
    use crate::network::{self, Network, NetworkConfig};
    use crate::signing::ServerKey;

    async fn server(seed: u8, request_timeout: Duration) -> Network {
        let identity = NodeIdentity::from_key(ServerKey::from_seed(&[seed; 32])).expect("identity");
        let (network, _events, event_loop) = network::new(
            &identity,
            NetworkConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("address")],
                request_timeout,
                ..NetworkConfig::default()
            },
        )
        .expect("network");
        tokio::spawn(event_loop.run());
        network
    }

    /// Two servers, `a` connected to `b`.
    async fn pair(request_timeout: Duration) -> (Network, Network) {
        let a = server(1, request_timeout).await;
        let b = server(2, request_timeout).await;
        let addr = loop {
            if let Some(addr) = b.listen_addrs().await.pop() {
                break addr;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        a.dial(addr.with(libp2p::multiaddr::Protocol::P2p(b.local_peer_id())))
            .await
            .expect("dial");
        for _ in 0..500 {
            if a.connected_peers().await.contains(&b.local_peer_id()) {
                return (a, b);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("a did not connect to b");
    }

    fn push_of(tag: &str) -> FedRequest {
        FedRequest::Push {
            events: vec![tag.to_string()],
        }
    }

    /// Answers a push by echoing its events, after `delay(tag)`; counts the links.
    fn serve(
        b: &Network,
        links: Arc<AtomicUsize>,
        delay: impl Fn(&str) -> Option<Duration> + Send + Sync + Clone + 'static,
    ) {
        let mut incoming = b.incoming_links().expect("incoming links");
        tokio::spawn(async move {
            while let Some(link) = incoming.next().await {
                links.fetch_add(1, Ordering::SeqCst);
                let delay = delay.clone();
                tokio::spawn(serve_link(link, move |request| {
                    let delay = delay.clone();
                    Box::pin(async move {
                        let FedRequest::Push { events } = request else {
                            return FedResponse::Done;
                        };
                        match delay(&events[0]) {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending::<()>().await,
                        }
                        FedResponse::Events {
                            events,
                            more: false,
                        }
                    })
                }));
            }
        });
    }

    /// The answer `serve` gives to a push tagged `tag`.
    fn echo_of(tag: &str) -> FedResponse {
        FedResponse::Events {
            events: vec![tag.to_string()],
            more: false,
        }
    }

    async fn the_next_push_opens_a_second_link(a: &Network, peer: PeerId, links: &AtomicUsize) {
        let answer = a
            .push(peer, push_of("next"))
            .await
            .expect("push on a new link");
        assert_eq!(answer, echo_of("next"));
        assert_eq!(links.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn answers_come_back_in_the_order_asked_on_one_link_even_when_later_ones_finish_first() {
        let (a, b) = pair(Duration::from_secs(10)).await;
        let links = Arc::new(AtomicUsize::new(0));
        // The first push takes longest to answer, the last one least.
        serve(&b, links.clone(), |tag| {
            let n: u64 = tag.parse().unwrap_or(0);
            Some(Duration::from_millis(80 - 10 * n))
        });
        let peer = b.local_peer_id();
        // The first push opens the link; eight more go out together on it.
        let first = a.push(peer, push_of("7")).await.expect("first push");
        assert_eq!(first, echo_of("7"));
        let answers =
            futures_util::future::join_all((0..8).map(|n| a.push(peer, push_of(&n.to_string()))))
                .await;
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.expect("push answered"), echo_of(&n.to_string()));
        }
        assert_eq!(links.load(Ordering::SeqCst), 1, "every push rode one link");
    }

    #[tokio::test]
    async fn a_frame_larger_than_a_request_may_be_closes_that_link_and_the_next_push_opens_another()
    {
        let (a, b) = pair(Duration::from_secs(10)).await;
        let links = Arc::new(AtomicUsize::new(0));
        serve(&b, links.clone(), |_| Some(Duration::ZERO));
        let peer = b.local_peer_id();
        let mut raw = a
            .control_for_tests()
            .open_stream(peer, StreamProtocol::new(PUSH_PROTOCOL))
            .await
            .expect("raw link");
        let too_big = u32::try_from(MAX_REQUEST_BYTES + 1).expect("fits");
        raw.write_all(&too_big.to_be_bytes()).await.expect("header");
        raw.flush().await.expect("flush");
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut rest)).await;
        assert!(
            matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
            "b closes the link without answering: {ended:?}"
        );

        the_next_push_opens_a_second_link(&a, peer, &links).await;
    }

    #[tokio::test]
    async fn a_peer_gets_at_most_four_links_at_once_and_another_when_one_closes() {
        let (a, b) = pair(Duration::from_secs(10)).await;
        let links = Arc::new(AtomicUsize::new(0));
        serve(&b, links.clone(), |_| Some(Duration::ZERO));
        let peer = b.local_peer_id();
        let open = || async {
            a.control_for_tests()
                .open_stream(peer, StreamProtocol::new(PUSH_PROTOCOL))
                .await
                .expect("raw link")
        };
        // A link is taken when b answers on it.
        let answered = |mut link: Stream, tag: &'static str| async move {
            let mut buf = Vec::new();
            write_frame(&mut link, &push_of(tag), &mut buf).await.ok()?;
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                read_frame::<_, FedResponse>(&mut link, MAX_RESPONSE_BYTES, &mut buf),
            )
            .await;
            match answer {
                Ok(Ok(Some(answer))) => Some((link, answer)),
                _ => None,
            }
        };
        let mut kept = Vec::new();
        for _ in 0..crate::network::LINKS_PER_PEER {
            let (link, answer) = answered(open().await, "taken").await.expect("answered");
            assert_eq!(answer, echo_of("taken"));
            kept.push(link);
        }
        assert!(
            answered(open().await, "fifth").await.is_none(),
            "a fifth link is refused"
        );

        let mut first = kept.remove(0);
        first.close().await.expect("close");
        drop(first);
        // b notices the close when its task for that link ends.
        for _ in 0..100 {
            if answered(open().await, "again").await.is_some() {
                assert_eq!(links.load(Ordering::SeqCst), 5);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no new link after one closed");
    }

    #[tokio::test]
    async fn a_link_that_does_not_answer_in_time_is_given_up_and_the_next_push_opens_another() {
        let (a, b) = pair(Duration::from_millis(300)).await;
        let links = Arc::new(AtomicUsize::new(0));
        serve(&b, links.clone(), |tag| {
            (tag != "stuck").then_some(Duration::ZERO)
        });
        let peer = b.local_peer_id();
        let err = a.push(peer, push_of("stuck")).await.expect_err("no answer");
        assert!(err.to_string().contains("timed out"), "{err}");

        the_next_push_opens_a_second_link(&a, peer, &links).await;
    }
}
