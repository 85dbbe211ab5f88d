//! Test harness: real Hearth nodes on loopback ports the OS hands out, and devices
//! that talk to them over real WebSockets.
//!
//! - [`TestNode`]: a node in this process with its own temporary data folder;
//!   it can be stopped and restarted on the same store.
//! - [`ChildNode`]: the `hearth` binary as a child process, for crash tests.
//! - [`TestUser`] and [`Device`]: an account, and one connected device of it with
//!   helpers that wait (bounded) for the frames a test expects.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hearth_client_api::model::Event;
use hearth_client_api::{AuthedClient, Client, ClientError, Connection, ServerFrame, Target};
use hearth_node::{Config, Node};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for any one expected frame before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A password every test account uses.
pub const PASSWORD: &str = "correct horse battery";

/// Settings for test nodes: loopback, port 0, generous rate limits.
pub fn test_config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_limit_per_sec: 100_000,
        rate_limit_burst: 100_000,
        log: "warn".into(),
        ..Config::default()
    }
}

/// Turns test settings into a federating server's.
pub fn federated(c: &mut Config, name: &str, bootstrap: Vec<String>) {
    c.server_name = name.to_string();
    c.federation_listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    c.bootstrap = bootstrap;
    // Catch-up runs when servers connect; the periodic round is pushed out of the
    // tests' reach, so events that should be pushed cannot arrive by catch-up instead.
    c.catchup_interval_secs = 3600;
    c.presence_refresh_secs = 2;
}

/// Waits (bounded) until `check` holds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while !check().await {
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: not within {:?}", WAIT * 3);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node running in this process.
pub struct TestNode {
    /// Where its client API listens.
    pub addr: SocketAddr,
    /// Its settings.
    pub config: Config,
    dir: Arc<tempfile::TempDir>,
    svc: Option<Arc<hearth_node::Services>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), hearth_node::NodeError>>>,
}

impl TestNode {
    /// Starts a node with the test settings.
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    /// Starts a node with the test settings changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestNode {
        let dir = Arc::new(tempfile::tempdir().expect("temporary folder"));
        let mut config = test_config(dir.path());
        tweak(&mut config);
        Self::launch(config, dir).await
    }

    async fn launch(config: Config, dir: Arc<tempfile::TempDir>) -> TestNode {
        let listener = TcpListener::bind(config.listen)
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let node = Node::open(config.clone()).await.expect("node opens");
        let svc = Some(node.services().clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(node.serve(listener, async move {
            let _ = stopped.await;
        }));
        TestNode {
            addr,
            config,
            dir,
            svc,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts a federating node named `name` that dials `bootstrap` (federation
    /// addresses of other test nodes), with short catch-up and presence intervals.
    pub async fn server(name: &str, bootstrap: &[String]) -> TestNode {
        let bootstrap = bootstrap.to_vec();
        let name = name.to_string();
        Self::start_with(move |c| federated(c, &name, bootstrap)).await
    }

    /// Restarts the node on its store, dialing `bootstrap` this time.
    pub async fn restart_with_bootstrap(&mut self, bootstrap: &[String]) {
        self.stop().await;
        let mut config = self.config.clone();
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.federation_listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        config.bootstrap = bootstrap.to_vec();
        *self = Self::launch(config, self.dir.clone()).await;
    }

    /// The node's services (for federation addresses and metrics).
    pub fn services(&self) -> &Arc<hearth_node::Services> {
        self.svc.as_ref().expect("the node is running")
    }

    /// Federation addresses (with `/p2p/<peer id>`), once the node listens.
    pub async fn federation_addrs(&self) -> Vec<String> {
        let fed = self
            .services()
            .federation
            .clone()
            .expect("federation is on");
        for _ in 0..200 {
            let addrs = fed.addresses().await;
            if !addrs.is_empty() {
                return addrs.iter().map(ToString::to_string).collect();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the node never listened for federation");
    }

    /// The value of a metric line that starts with `name` (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        self.services()
            .metrics
            .render()
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An unauthenticated client of this node.
    pub fn client(&self) -> Client {
        Client::new(&self.url()).expect("valid url")
    }

    /// The node's data folder.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the node gracefully and waits until its store is closed.
    pub async fn stop(&mut self) {
        self.svc = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("node stops in time")
                .expect("node task")
                .expect("node stops cleanly");
        }
    }

    /// Stops the node and starts it again on the same store (on a new port).
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut config = self.config.clone();
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        *self = Self::launch(config, self.dir.clone()).await;
    }

    /// Registers `name` and logs in its first device.
    pub async fn user(&self, name: &str) -> TestUser {
        let session = self
            .client()
            .register(name, PASSWORD, Some("test device"))
            .await
            .expect("register");
        TestUser {
            id: session.user.clone(),
            name: name.to_string(),
            api: self.client().with_token(session.token),
            node_url: self.url(),
        }
    }

    /// Logs `user` in on another device.
    pub async fn login(&self, user: &TestUser) -> TestUser {
        let session = self
            .client()
            .login(&user.name, PASSWORD, Some("second device"))
            .await
            .expect("login");
        TestUser {
            id: session.user.clone(),
            name: user.name.clone(),
            api: self.client().with_token(session.token),
            node_url: self.url(),
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One logged-in device of an account (its token), not yet connected.
#[derive(Debug, Clone)]
pub struct TestUser {
    /// Full user id.
    pub id: String,
    /// Local part.
    pub name: String,
    /// HTTP client with this device's token.
    pub api: AuthedClient,
    node_url: String,
}

impl TestUser {
    /// Opens this device's WebSocket session and reads its backlog.
    pub async fn connect(&self) -> Device {
        let conn = tokio::time::timeout(WAIT, self.api.connect_session())
            .await
            .expect("connect in time")
            .expect("session opens");
        let mut device = Device {
            conn,
            queued: VecDeque::new(),
            backlog: Vec::new(),
            keys: 0,
        };
        device.backlog = device.read_backlog().await;
        device
    }

    /// The same device against a node that moved to another address (after restart).
    pub fn on(&self, node: &TestNode) -> TestUser {
        TestUser {
            api: node.client().with_token(self.api.token().to_string()),
            node_url: node.url(),
            ..self.clone()
        }
    }

    /// The node URL this device talks to.
    pub fn node_url(&self) -> &str {
        &self.node_url
    }
}

/// A connected device.
pub struct Device {
    conn: Connection,
    queued: VecDeque<ServerFrame>,
    /// Events the backlog delivered on connect, oldest first.
    pub backlog: Vec<Event>,
    keys: u64,
}

impl Device {
    /// What the server said in `ready`.
    pub fn ready(&self) -> &hearth_client_api::Ready {
        self.conn.ready()
    }

    async fn read_backlog(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            match self.frame().await {
                ServerFrame::Sync {
                    events: batch,
                    more,
                } => {
                    events.extend(batch);
                    if !more {
                        return events;
                    }
                }
                other => self.queued.push_back(other),
            }
        }
    }

    /// The next frame from the server (queued ones first); fails the test after [`WAIT`].
    pub async fn frame(&mut self) -> ServerFrame {
        if let Some(f) = self.queued.pop_front() {
            return f;
        }
        self.read().await.expect("the session is still open")
    }

    /// Reads the next frame, heartbeating while it waits as a real client does.
    async fn read(&mut self) -> Option<ServerFrame> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let every = self.conn.ready().heartbeat_interval();
        loop {
            let tick = tokio::time::sleep(every);
            tokio::select! {
                frame = self.conn.next_frame() => match frame {
                    Ok(frame) => return frame,
                    Err(e) => panic!("session failed: {e}"),
                },
                _ = tick => {
                    if tokio::time::Instant::now() >= deadline {
                        panic!("no frame from the server within {WAIT:?}");
                    }
                    self.conn.heartbeat().await.expect("heartbeat");
                }
            }
        }
    }

    /// A presence frame of `user` that arrived and has not been consumed yet.
    pub fn queued_presence_of(&self, user: &str) -> Option<hearth_client_api::model::PresenceInfo> {
        self.queued.iter().find_map(|f| match f {
            ServerFrame::Presence(p) if p.user == user => Some(p.clone()),
            _ => None,
        })
    }

    /// Waits for the next frame that `pick` accepts, keeping the others queued.
    pub async fn wait_for<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        if let Some(i) = self.queued.iter().position(|f| pick(f).is_some()) {
            let f = self.queued.remove(i).expect("present");
            return pick(&f).expect("picked");
        }
        loop {
            let f = self.read().await.expect("the session is still open");
            match pick(&f) {
                Some(v) => return v,
                None => self.queued.push_back(f),
            }
        }
    }

    /// The next live event.
    pub async fn event(&mut self) -> Event {
        self.wait_for(|f| match f {
            ServerFrame::Event { event } => Some(event.clone()),
            _ => None,
        })
        .await
    }

    /// The next live message event's body.
    pub async fn message(&mut self) -> (String, String) {
        loop {
            let e = self.event().await;
            if let hearth_client_api::model::EventContent::Message { body } = &e.content {
                return (e.sender.clone(), body.clone());
            }
        }
    }

    /// The next error frame: `(code, key)`.
    pub async fn error(&mut self) -> (hearth_client_api::ErrorCode, Option<String>) {
        self.wait_for(|f| match f {
            ServerFrame::Error { code, key, .. } => Some((*code, key.clone())),
            _ => None,
        })
        .await
    }

    /// A fresh idempotency key, unique across every device of this test process (keys
    /// are per user, so two devices of one user must not reuse each other's).
    pub fn key(&mut self) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.keys += 1;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("k{n}-{}", self.keys)
    }

    /// Sends with `key` and waits for its ack: `(event_id, channel)`.
    pub async fn send_keyed(&mut self, key: &str, target: Target, body: &str) -> (String, String) {
        self.conn
            .send_message(key.to_string(), target, body)
            .await
            .expect("send frame");
        let key = key.to_string();
        self.wait_for(|f| match f {
            ServerFrame::Ack {
                key: k,
                event_id,
                channel,
                ..
            } if *k == key => Some(Ok((event_id.clone(), channel.clone()))),
            ServerFrame::Error {
                key: Some(k),
                code,
                message,
            } if *k == key => Some(Err(format!("{code}: {message}"))),
            _ => None,
        })
        .await
        .unwrap_or_else(|e| panic!("send refused: {e}"))
    }

    /// Sends a message to a user and waits for its ack.
    pub async fn send_to(&mut self, user: &str, body: &str) -> (String, String) {
        let key = self.key();
        self.send_keyed(&key, Target::User(user.to_string()), body)
            .await
    }

    /// Sends a message to a channel and waits for its ack.
    pub async fn send_in(&mut self, channel: &str, body: &str) -> (String, String) {
        let key = self.key();
        self.send_keyed(&key, Target::Channel(channel.to_string()), body)
            .await
    }

    /// Sends any frame.
    pub async fn send_frame(&mut self, frame: &hearth_client_api::ClientFrame) {
        self.conn.send(frame).await.expect("send frame");
    }

    /// Acknowledges everything up to `pos`.
    pub async fn ack(&mut self, pos: u64) {
        self.conn.ack_cursor(pos).await.expect("cursor frame");
    }

    /// Waits until the server closes the session; returns the close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.conn.next_frame()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return 1000,
                Ok(Err(ClientError::Closed { code, .. })) => return code,
                Ok(Err(e)) => panic!("session failed without a close code: {e}"),
                Err(_) => panic!("the server did not close the session within {WAIT:?}"),
            }
        }
    }

    /// Closes the session from the client side.
    pub async fn close(self) {
        let _ = self.conn.close().await;
    }
}

/// The `hearth` binary running as a child process.
pub struct ChildNode {
    /// Where its client API listens.
    pub addr: SocketAddr,
    child: Child,
}

/// Path of the `hearth` binary built for these tests. Cargo tells only integration
/// tests where it is, so this expands in the test, not here.
#[macro_export]
macro_rules! hearth_bin {
    () => {
        std::path::Path::new(env!("CARGO_BIN_EXE_hearth-under-test"))
    };
}

impl ChildNode {
    /// Starts `hearth serve` (the binary at `bin`, see [`hearth_bin!`]) on `data_dir` on a free loopback port, and waits until it
    /// says it is ready.
    pub fn start(bin: &Path, data_dir: &Path) -> ChildNode {
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log",
                "info",
                "--data-dir",
            ])
            .arg(data_dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the hearth binary");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ready on http://").nth(1) {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child node reports its address");
        ChildNode {
            addr: addr.parse().expect("an address"),
            child,
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the process with SIGKILL: no shutdown, no flush.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
