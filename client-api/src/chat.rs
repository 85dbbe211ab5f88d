//! The line-based terminal chat client behind `hearth-chat` (and the node's `hearth chat`).
//!
//! One conversation is "open" at a time: a plain line is sent there, and lines that
//! start with `/` are commands (`/help` lists them). Events of every channel are
//! printed as they arrive, labelled with their channel unless it is the open one.
//! With `--token-file`, the device's session is kept in a file and reused by later
//! runs, so the sync cursor carries over; without it each run logs in as a new device
//! and logs that device out at the end, since its token could never be used again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::error::Error as StdError;
use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::http::Session;
use crate::model::{
    ChannelKind, ChannelSummary, Event, EventContent, MembershipAction, PresenceInfo,
    PresenceStatus, Role,
};
use crate::{
    AuthedClient, Client, ClientError, ErrorCode, KeyGen, Ready, ServerFrame, SessionReceiver,
    SessionSender, Target, close,
};

/// Messages shown when a conversation is opened.
const OPEN_HISTORY: u32 = 10;
/// Default and largest `/history` length.
const DEFAULT_HISTORY: usize = 20;
const MAX_HISTORY: usize = 1000;
/// History page size asked from the server while paging back.
const HISTORY_PAGE: usize = 100;
/// Reconnect attempts in a row before giving up.
const MAX_RECONNECTS: u32 = 8;
/// A session that lasted this long resets the reconnect counter.
const STABLE_SESSION: Duration = Duration::from_secs(60);
/// Event ids remembered as already printed.
const SEEN_CAPACITY: usize = 4096;
/// How long quitting waits for the server to answer the close.
const QUIT_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Command-line arguments of the chat client.
#[derive(Clone, clap::Args)]
pub struct ChatArgs {
    /// Base URL of the Hearth node.
    #[arg(long, env = "HEARTH_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Username (the part before `@`).
    #[arg(long, env = "HEARTH_USER")]
    pub user: String,
    /// Password (needed unless the token file holds a valid session). Prefer the
    /// HEARTH_PASSWORD variable: other users can see flags in `ps`.
    #[arg(long, env = "HEARTH_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Create the account before logging in.
    #[arg(long)]
    pub register: bool,
    /// Name of the device this run logs in as.
    #[arg(long, default_value = "hearth-chat")]
    pub device_name: String,
    /// Conversation to open at start: a username, user id, channel id or group name.
    #[arg(long)]
    pub open: Option<String>,
    /// Backlog events to print at start; older ones are only counted.
    #[arg(long, default_value_t = 20)]
    pub backlog: usize,
    /// File that keeps this device's session between runs (created with mode 0600).
    /// Without it, every run is a new device that is logged out at exit.
    #[arg(long, env = "HEARTH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl fmt::Debug for ChatArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written so the password never reaches a log.
        f.debug_struct("ChatArgs")
            .field("server", &self.server)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("register", &self.register)
            .field("device_name", &self.device_name)
            .field("open", &self.open)
            .field("backlog", &self.backlog)
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// Runs the chat client until the user quits (`/quit`, end of input or Ctrl-C).
///
/// Fails if login fails or the session ends for a reason a reconnect cannot fix
/// (logged out elsewhere, token revoked, too many failed reconnects).
pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    // `127.0.0.1:8080` is what people type; the library wants a full URL.
    let server = if args.server.contains("://") {
        args.server.clone()
    } else {
        format!("http://{}", args.server)
    };
    let client =
        Client::new(&server).with_context(|| format!("cannot use server URL {:?}", args.server))?;
    let session = log_in(&client, &args).await?;
    println!(
        "logged in as {} (device {}); times are UTC; /help lists commands",
        session.user, session.device
    );
    let api = client.with_token(session.token.clone());
    let mut input = spawn_stdin_reader()?;
    let mut chat = Chat::new(api.clone(), session.user, args.backlog);
    let result = chat.run(&mut input, args.open.as_deref()).await;
    // A kept device must stay logged in; a throwaway one is logged out (a session
    // that ended with 4006 is logged out already, which this reports harmlessly).
    if args.token_file.is_none()
        && let Err(e) = api.logout().await
    {
        println!("! could not log this device out: {}", describe(&e));
    }
    result
}

/// The session to use: the saved one if it is still valid, else a new login.
async fn log_in(client: &Client, args: &ChatArgs) -> anyhow::Result<Session> {
    if let Some(path) = &args.token_file
        && !args.register
        && let Some(saved) = load_session(path, &args.user)
    {
        match client.with_token(saved.token.clone()).me().await {
            Ok(_) => return Ok(saved),
            Err(e) if e.code() == Some(ErrorCode::Unauthorized) => {
                println!("* the saved session has expired; logging in again");
            }
            Err(e) => return Err(e).context("cannot check the saved session"),
        }
    }
    let password = args
        .password
        .as_deref()
        .context("a password is needed: pass --password or set HEARTH_PASSWORD")?;
    let device = Some(args.device_name.as_str());
    let session = if args.register {
        client
            .register(&args.user, password, device)
            .await
            .with_context(|| format!("cannot register {:?}", args.user))?
    } else {
        client
            .login(&args.user, password, device)
            .await
            .with_context(|| format!("cannot log in as {:?}", args.user))?
    };
    if let Some(path) = &args.token_file {
        save_session(path, &session)
            .with_context(|| format!("cannot write the token file {}", path.display()))?;
    }
    Ok(session)
}

/// The saved session for `user`, if the file exists and holds one.
fn load_session(path: &Path, user: &str) -> Option<Session> {
    let text = std::fs::read_to_string(path).ok()?;
    let session: Session = serde_json::from_str(&text).ok()?;
    // A file written for another account is not this user's session.
    let local = session.user.split('@').next().unwrap_or_default();
    (local == user || session.user == user).then_some(session)
}

fn save_session(path: &Path, session: &Session) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // The token is a credential: readable by its owner only.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    let json = serde_json::to_string(session).map_err(std::io::Error::other)?;
    file.write_all(json.as_bytes())
}

/// Reads stdin lines on a plain thread. tokio's stdin reads on a blocking-pool
/// thread that the runtime waits for at shutdown, so the program could not exit
/// while a read is pending; a detached thread ends with the process instead.
fn spawn_stdin_reader() -> anyhow::Result<mpsc::Receiver<String>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the input thread")?;
    Ok(rx)
}

/// A parsed input line.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Say(String),
    List,
    Open(String),
    Group { name: String, members: Vec<String> },
    Add(String),
    Remove(String),
    Leave,
    History(usize),
    Who,
    Help,
    Quit,
}

const HELP: &str = "\
commands:
  <text>                      send to the open conversation (//text sends \"/text\")
  /list                       your channels with their last message
  /open <user|channel>        open a conversation: a username, user id, channel id or group name
  /group <name> <user>...     create a group with these users and open it
  /add <user>                 add a user to the open group (admins)
  /remove <user>              remove a user from the open group (admins)
  /leave                      leave the open group
  /history [n]                the last n messages of the open conversation (default 20)
  /who                        members of the open conversation and their presence
  /help                       this text
  /quit                       log this device out and exit";

/// Parses one input line; `Ok(None)` for a blank line, `Err` with a usage hint.
fn parse_line(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    if let Some(literal) = line.strip_prefix("//") {
        return Ok(Some(Command::Say(format!("/{literal}"))));
    }
    let Some(command) = line.strip_prefix('/') else {
        return Ok(Some(Command::Say(line.to_owned())));
    };
    let mut words = command.split_whitespace();
    let name = words.next().unwrap_or_default();
    let args: Vec<String> = words.map(str::to_owned).collect();
    let one = |usage: &str| match args.as_slice() {
        [arg] => Ok(arg.clone()),
        _ => Err(format!("usage: {usage}")),
    };
    let none = |command: Command| {
        if args.is_empty() {
            Ok(command)
        } else {
            Err(format!("/{name} takes no arguments"))
        }
    };
    let command = match name {
        "list" => none(Command::List)?,
        "open" => Command::Open(one("/open <user-or-channel>")?),
        "group" => match args.split_first() {
            Some((name, members)) if !members.is_empty() => Command::Group {
                name: name.clone(),
                members: members.to_vec(),
            },
            _ => return Err("usage: /group <name> <user> [user...]".into()),
        },
        "add" => Command::Add(one("/add <user>")?),
        "remove" => Command::Remove(one("/remove <user>")?),
        "leave" => none(Command::Leave)?,
        "history" => match args.as_slice() {
            [] => Command::History(DEFAULT_HISTORY),
            [n] => match n.parse::<usize>() {
                Ok(n) if (1..=MAX_HISTORY).contains(&n) => Command::History(n),
                _ => return Err(format!("usage: /history [1..{MAX_HISTORY}]")),
            },
            _ => return Err(format!("usage: /history [1..{MAX_HISTORY}]")),
        },
        "who" => none(Command::Who)?,
        "help" | "?" => Command::Help,
        "quit" | "exit" => Command::Quit,
        _ => return Err(format!("unknown command /{name}; /help lists commands")),
    };
    Ok(Some(command))
}

/// Whether the session loop goes on.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

/// Why a session ended.
enum End {
    Quit,
    Lost(ClientError),
}

/// Backlog events of the current `sync`, of which only the newest are printed: a
/// new device starts at cursor 0 and would otherwise scroll the whole history by.
#[derive(Debug, Default)]
struct Backlog {
    active: bool,
    tail: VecDeque<Event>,
    hidden: usize,
}

/// A message sent but not acknowledged yet, kept to resend with the same key.
#[derive(Debug)]
struct Pending {
    channel: String,
    body: String,
    /// Refused with `rate_limited`/`internal`: resend at the next heartbeat tick.
    retry: bool,
}

/// The chat client's state across reconnects.
struct Chat {
    api: AuthedClient,
    me: String,
    /// The server part of `me`, to complete bare usernames.
    domain: String,
    channels: HashMap<String, ChannelSummary>,
    /// Id of the open conversation.
    open: Option<String>,
    keys: KeyGen,
    /// Messages sent but not yet acknowledged, by idempotency key.
    pending: HashMap<String, Pending>,
    /// Newest stream position received; acknowledged to the server as the cursor.
    last_pos: u64,
    backlog: Backlog,
    backlog_limit: usize,
    seen: Seen,
    /// Labels of channels we left or were removed from, for their late events.
    former: HashMap<String, String>,
}

/// Ids of the events printed lately, so an event shown by the history of a newly
/// opened conversation is not printed again when its live copy arrives.
#[derive(Debug, Default)]
struct Seen {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// Records `id`; false if it was already recorded.
    fn insert(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > SEEN_CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        true
    }
}

impl Chat {
    fn new(api: AuthedClient, me: String, backlog_limit: usize) -> Self {
        let domain = me
            .rsplit_once('@')
            .map(|(_, domain)| domain.to_owned())
            .unwrap_or_default();
        Chat {
            api,
            me,
            domain,
            channels: HashMap::new(),
            open: None,
            keys: KeyGen::new(),
            pending: HashMap::new(),
            last_pos: 0,
            backlog: Backlog::default(),
            backlog_limit,
            seen: Seen::default(),
            former: HashMap::new(),
        }
    }

    /// Connects, runs sessions and reconnects after transient failures.
    async fn run(
        &mut self,
        input: &mut mpsc::Receiver<String>,
        open: Option<&str>,
    ) -> anyhow::Result<()> {
        if let Err(e) = self.refresh_channels().await {
            println!("! cannot list channels: {}", describe(&e));
        }
        if let Some(target) = open
            && let Err(e) = self.open_conversation(target).await
        {
            println!("! cannot open {target}: {}", describe(&e));
        }
        let mut failures = 0u32;
        loop {
            match self.api.connect_session().await {
                Ok(connection) => {
                    let started = Instant::now();
                    if failures > 0 {
                        println!("* reconnected");
                    }
                    let (mut tx, mut rx, ready) = connection.split();
                    match self.session(&mut tx, &mut rx, &ready, input).await {
                        End::Quit => {
                            // Tell the server this is a clean close, then leave.
                            if tx.close().await.is_ok() {
                                let _ =
                                    tokio::time::timeout(QUIT_CLOSE_TIMEOUT, rx.next_frame()).await;
                            }
                            return Ok(());
                        }
                        End::Lost(e) => {
                            if !e.is_transient() {
                                return Err(e).context("the session ended");
                            }
                            println!("! connection lost: {}", describe(&e));
                            if started.elapsed() >= STABLE_SESSION {
                                failures = 0;
                            }
                        }
                    }
                }
                Err(e) => {
                    if !e.is_transient() {
                        return Err(e).context("cannot open the session");
                    }
                    println!("! cannot connect: {}", describe(&e));
                }
            }
            failures += 1;
            if failures > MAX_RECONNECTS {
                anyhow::bail!("giving up after {MAX_RECONNECTS} failed reconnects");
            }
            let delay = reconnect_delay(failures);
            println!(
                "  reconnecting in {} s (/quit to stop)",
                delay.as_secs().max(1)
            );
            if wait_offline(delay, input).await == Flow::Quit {
                return Ok(());
            }
        }
    }

    /// One WebSocket session: frames in, lines in, heartbeats out.
    async fn session(
        &mut self,
        tx: &mut SessionSender,
        rx: &mut SessionReceiver,
        ready: &Ready,
        input: &mut mpsc::Receiver<String>,
    ) -> End {
        self.last_pos = self.last_pos.max(ready.cursor);
        self.backlog = Backlog {
            active: true,
            ..Backlog::default()
        };
        // Sends of an earlier session that never got their ack: the same key makes
        // the resend safe (stored at most once, the original ack comes back).
        let unanswered: Vec<String> = self.pending.keys().cloned().collect();
        for key in unanswered {
            if let Err(e) = self.resend(&key, tx).await {
                return End::Lost(e);
            }
        }
        let period = ready.heartbeat_interval();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        // After a stall, one heartbeat is enough; a burst of them is not needed.
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // Every branch is cancel safe: next_frame and recv lose nothing when
            // another branch wins.
            let step = tokio::select! {
                frame = rx.next_frame() => match frame {
                    Ok(Some(frame)) => self.on_frame(frame, tx).await,
                    Ok(None) => Err(ClientError::Closed {
                        code: close::NORMAL,
                        reason: "closed by the server".into(),
                    }),
                    // Frame types newer than this client are ignored (protocol.md 12).
                    Err(ClientError::BadFrame(e)) => {
                        tracing::debug!(error = %e, "ignoring an unknown frame");
                        Ok(Flow::Continue)
                    }
                    Err(e) => Err(e),
                },
                line = input.recv() => match line {
                    Some(line) => self.on_line(&line, tx).await,
                    None => Ok(Flow::Quit),
                },
                _ = heartbeat.tick() => self.on_tick(tx).await,
                _ = tokio::signal::ctrl_c() => Ok(Flow::Quit),
            };
            match step {
                Ok(Flow::Continue) => {}
                Ok(Flow::Quit) => return End::Quit,
                Err(e) => return End::Lost(e),
            }
        }
    }

    /// Handles a server frame; errors are session failures.
    async fn on_frame(
        &mut self,
        frame: ServerFrame,
        tx: &mut SessionSender,
    ) -> Result<Flow, ClientError> {
        match frame {
            ServerFrame::Sync { events, more } => {
                let newest = self.last_pos;
                for event in events {
                    if self.is_new(&event) {
                        self.note_event(&event).await;
                        self.backlog.tail.push_back(event);
                        if self.backlog.tail.len() > self.backlog_limit {
                            self.backlog.tail.pop_front();
                            self.backlog.hidden += 1;
                        }
                    }
                }
                if self.last_pos > newest {
                    tx.ack_cursor(self.last_pos).await?;
                }
                if !more {
                    self.flush_backlog();
                }
            }
            ServerFrame::Event { event } => {
                // A server that sends no final `sync` still gets its backlog shown.
                self.flush_backlog();
                if self.is_new(&event) {
                    self.note_event(&event).await;
                    self.print_event(&event);
                    if let Some(pos) = event.pos {
                        tx.ack_cursor(pos).await?;
                    }
                }
            }
            ServerFrame::Ack { key, channel, .. } => {
                self.pending.remove(&key);
                if !self.channels.contains_key(&channel) {
                    self.fetch_channel(&channel).await;
                }
            }
            ServerFrame::Presence(presence) => {
                println!("* {}", describe_presence(&presence, now_ms()))
            }
            ServerFrame::Error { code, message, key } => match key {
                Some(key) if matches!(code, ErrorCode::RateLimited | ErrorCode::Internal) => {
                    // Not stored: resend later with the same key (protocol.md 5.6).
                    if let Some(pending) = self.pending.get_mut(&key) {
                        pending.retry = true;
                        println!("! message delayed ({code}); retrying shortly");
                    }
                }
                Some(key) => {
                    let to = self
                        .pending
                        .remove(&key)
                        .map(|p| format!(" to {}", self.label(&p.channel)))
                        .unwrap_or_default();
                    println!("! message{to} not delivered: {code}: {message}");
                }
                None => println!("! server: {code}: {message}"),
            },
            ServerFrame::Ready { .. } => {
                println!("! unexpected second ready frame ignored");
            }
        }
        Ok(Flow::Continue)
    }

    /// Whether an event has not been seen yet (by stream position), advancing it.
    fn is_new(&mut self, event: &Event) -> bool {
        match event.pos {
            Some(pos) if pos <= self.last_pos => false,
            Some(pos) => {
                self.last_pos = pos;
                true
            }
            None => true,
        }
    }

    fn flush_backlog(&mut self) {
        if !self.backlog.active {
            return;
        }
        self.backlog.active = false;
        if self.backlog.hidden > 0 {
            println!(
                "  ({} older events not shown; /history pages back)",
                self.backlog.hidden
            );
        }
        let tail = std::mem::take(&mut self.backlog.tail);
        for event in &tail {
            self.print_event(event);
        }
    }

    /// Keeps the channel cache in step with an event.
    async fn note_event(&mut self, event: &Event) {
        let Some(channel) = self.channels.get_mut(&event.channel) else {
            // A channel we left only comes back if we are added again; its other
            // late events are not worth a request that would be refused.
            let readded = matches!(
                &event.content,
                EventContent::Membership { action: MembershipAction::Add, user, .. } if user == &self.me
            );
            if readded || !self.former.contains_key(&event.channel) {
                // A new group or direct chat, or one we were added back to.
                self.fetch_channel(&event.channel).await;
            }
            return;
        };
        if channel
            .last_event
            .as_ref()
            .is_none_or(|last| event.ts >= last.ts)
        {
            channel.last_event = Some(event.clone());
        }
        // The backlog replays changes the cached summary already includes: only a
        // membership version newer than the cached one changes anything.
        let EventContent::Membership {
            action,
            user,
            version,
            ..
        } = &event.content
        else {
            return;
        };
        if *version <= channel.version {
            return;
        }
        channel.version = *version;
        match action {
            MembershipAction::Add => channel.member_count += 1,
            MembershipAction::Remove | MembershipAction::Leave => {
                channel.member_count = channel.member_count.saturating_sub(1);
                if user == &self.me {
                    self.forget_channel(&event.channel);
                    if self.open.as_deref() == Some(event.channel.as_str()) {
                        self.open = None;
                        println!("* you are no longer in this conversation; it is closed");
                    }
                }
            }
            MembershipAction::Create => {}
        }
    }

    /// Drops a channel we are no longer in, keeping its label for late events.
    fn forget_channel(&mut self, id: &str) {
        if let Some(channel) = self.channels.remove(id) {
            self.former.insert(id.to_owned(), channel_label(&channel));
        }
    }

    /// Learns a channel the cache does not know (new group, first direct message).
    async fn fetch_channel(&mut self, id: &str) {
        match self.api.channel(id).await {
            Ok(channel) => {
                self.former.remove(&channel.id);
                self.channels.insert(channel.id.clone(), channel);
            }
            // Printed with the raw id then; not worth interrupting the conversation.
            Err(e) => tracing::debug!(channel = id, error = %e, "cannot fetch channel"),
        }
    }

    /// Prints a stream event unless it was printed already.
    fn print_event(&mut self, event: &Event) {
        if !self.seen.insert(&event.id) {
            return;
        }
        let label = (self.open.as_deref() != Some(event.channel.as_str()))
            .then(|| self.label(&event.channel));
        println!("{}", format_event(event, label.as_deref(), now_ms()));
    }

    /// How a channel is shown: `#group` or `@user@server`, else its id.
    fn label(&self, id: &str) -> String {
        match self.channels.get(id) {
            Some(channel) => channel_label(channel),
            None => self
                .former
                .get(id)
                .cloned()
                .unwrap_or_else(|| id.to_owned()),
        }
    }

    /// Handles an input line; errors are session failures, command errors are printed.
    async fn on_line(&mut self, line: &str, tx: &mut SessionSender) -> Result<Flow, ClientError> {
        let command = match parse_line(line) {
            Ok(Some(command)) => command,
            Ok(None) => return Ok(Flow::Continue),
            Err(usage) => {
                println!("! {usage}");
                return Ok(Flow::Continue);
            }
        };
        match command {
            Command::Say(body) => self.say(body, tx).await?,
            Command::Quit => return Ok(Flow::Quit),
            Command::Help => println!("{HELP}"),
            other => {
                if let Err(e) = self.command(other).await {
                    println!("! {}", describe(&e));
                }
            }
        }
        Ok(Flow::Continue)
    }

    async fn say(&mut self, body: String, tx: &mut SessionSender) -> Result<(), ClientError> {
        let Some(channel) = self.open.clone() else {
            println!("! no open conversation; /open <user-or-channel> first (/help)");
            return Ok(());
        };
        let key = self.keys.next_key();
        match tx
            .send_message(key.clone(), Target::Channel(channel.clone()), body.clone())
            .await
        {
            Ok(()) => {
                self.pending.insert(
                    key,
                    Pending {
                        channel,
                        body,
                        retry: false,
                    },
                );
                Ok(())
            }
            Err(e @ ClientError::FrameTooLarge { .. }) => {
                println!("! not sent: {e}");
                Ok(())
            }
            Err(e) => {
                // Kept so the next session resends it.
                self.pending.insert(
                    key,
                    Pending {
                        channel,
                        body,
                        retry: false,
                    },
                );
                Err(e)
            }
        }
    }

    /// Heartbeat, plus the resends that were refused for load.
    async fn on_tick(&mut self, tx: &mut SessionSender) -> Result<Flow, ClientError> {
        tx.heartbeat().await?;
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.retry)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            self.resend(&key, tx).await?;
        }
        Ok(Flow::Continue)
    }

    async fn resend(&mut self, key: &str, tx: &mut SessionSender) -> Result<(), ClientError> {
        let Some(pending) = self.pending.get_mut(key) else {
            return Ok(());
        };
        pending.retry = false;
        let target = Target::Channel(pending.channel.clone());
        tx.send_message(key, target, pending.body.clone()).await
    }

    /// The commands that talk HTTP.
    async fn command(&mut self, command: Command) -> Result<(), ClientError> {
        match command {
            Command::List => {
                self.refresh_channels().await?;
                self.print_channels();
            }
            Command::Open(target) => self.open_conversation(&target).await?,
            Command::Group { name, members } => {
                let members: Vec<String> = members.iter().map(|m| self.qualify(m)).collect();
                let channel = self.api.create_group(&name, &members).await?;
                println!("* created {} ({})", channel_label(&channel), channel.id);
                self.show_open(channel);
            }
            Command::Add(user) => {
                let Some(channel) = self.open_channel() else {
                    return Ok(());
                };
                let user = self.qualify(&user);
                let members = self.api.add_member(&channel, &user).await?;
                println!("* added {user}; {}", members_text(members.members.len()));
            }
            Command::Remove(user) => {
                let Some(channel) = self.open_channel() else {
                    return Ok(());
                };
                let user = self.qualify(&user);
                let members = self.api.remove_member(&channel, &user).await?;
                println!("* removed {user}; {}", members_text(members.members.len()));
            }
            Command::Leave => {
                let Some(channel) = self.open_channel() else {
                    return Ok(());
                };
                self.api.leave(&channel).await?;
                println!("* left {}", self.label(&channel));
                self.forget_channel(&channel);
                self.open = None;
            }
            Command::History(n) => {
                let Some(channel) = self.open_channel() else {
                    return Ok(());
                };
                self.print_history(&channel, n).await?;
            }
            Command::Who => {
                let Some(channel) = self.open_channel() else {
                    return Ok(());
                };
                self.print_members(&channel).await?;
            }
            // Handled by on_line; listed so a new command is not silently ignored.
            Command::Say(_) | Command::Help | Command::Quit => {}
        }
        Ok(())
    }

    /// The open channel's id, or a hint printed.
    fn open_channel(&self) -> Option<String> {
        if self.open.is_none() {
            println!("! no open conversation; /open <user-or-channel> first");
        }
        self.open.clone()
    }

    /// `alice` means `alice@<our server>`; ids with `@` are taken as they are.
    fn qualify(&self, user: &str) -> String {
        qualify(user, &self.domain)
    }

    async fn refresh_channels(&mut self) -> Result<(), ClientError> {
        let list = self.api.channels().await?;
        self.channels = list
            .channels
            .into_iter()
            .map(|channel| (channel.id.clone(), channel))
            .collect();
        self.former.retain(|id, _| !self.channels.contains_key(id));
        Ok(())
    }

    fn print_channels(&self) {
        if self.channels.is_empty() {
            println!("  no channels yet; /open <user> starts a direct chat");
            return;
        }
        let mut channels: Vec<&ChannelSummary> = self.channels.values().collect();
        // Most recently active first, as the server lists them.
        channels.sort_by_key(|c| std::cmp::Reverse(c.last_event.as_ref().map_or(0, |e| e.ts)));
        let now = now_ms();
        for channel in channels {
            let mark = if self.open.as_deref() == Some(channel.id.as_str()) {
                '*'
            } else {
                ' '
            };
            let last = channel.last_event.as_ref().map_or_else(
                || "(no messages)".to_owned(),
                |e| format_event(e, None, now),
            );
            println!(
                "{mark} {:<24} {:<24} {:<11} {last}",
                channel_label(channel),
                channel.id,
                members_text(channel.member_count)
            );
        }
    }

    /// `/open`: a known channel id, a group name, or else a user (direct chat).
    async fn open_conversation(&mut self, target: &str) -> Result<(), ClientError> {
        if self.find_channel(target).is_none() {
            // Our own list may be stale (added to a group since start).
            self.refresh_channels().await?;
        }
        let channel = match self.find_channel(target) {
            Some(channel) => channel.clone(),
            None => {
                let user = self.qualify(target.strip_prefix('@').unwrap_or(target));
                if user == self.me {
                    println!("! that is you; /open another user or a channel");
                    return Ok(());
                }
                self.api.open_direct(&user).await?
            }
        };
        self.show_open(channel);
        if let Some(id) = self.open.clone()
            && let Err(e) = self.print_history(&id, OPEN_HISTORY as usize).await
        {
            println!("! cannot load history: {}", describe(&e));
        }
        Ok(())
    }

    fn find_channel(&self, target: &str) -> Option<&ChannelSummary> {
        let name = target.strip_prefix('#').unwrap_or(target);
        self.channels.get(target).or_else(|| {
            self.channels
                .values()
                .find(|c| c.kind == ChannelKind::Group && c.name == name)
        })
    }

    fn show_open(&mut self, channel: ChannelSummary) {
        match channel.kind {
            ChannelKind::Direct => println!("* now talking with {}", channel.name),
            ChannelKind::Group => println!(
                "* now talking in #{} ({})",
                channel.name,
                members_text(channel.member_count)
            ),
        }
        self.open = Some(channel.id.clone());
        self.channels.insert(channel.id.clone(), channel);
    }

    /// The last `n` events of a channel, oldest first.
    async fn print_history(&mut self, channel: &str, n: usize) -> Result<(), ClientError> {
        let mut events = Vec::new();
        let mut before: Option<String> = None;
        while events.len() < n {
            let want = (n - events.len()).min(HISTORY_PAGE);
            let limit = u32::try_from(want).unwrap_or(u32::MAX);
            let page = self
                .api
                .history(channel, before.as_deref(), Some(limit))
                .await?;
            let got = page.events.len();
            events.extend(page.events);
            match page.next {
                Some(next) if got > 0 => before = Some(next),
                _ => break,
            }
        }
        events.truncate(n);
        if events.is_empty() {
            println!("  (no messages yet)");
        }
        let now = now_ms();
        for event in events.iter().rev() {
            // Always printed (asked for), and remembered so its live copy is not.
            self.seen.insert(&event.id);
            println!("{}", format_event(event, None, now));
        }
        Ok(())
    }

    async fn print_members(&self, channel: &str) -> Result<(), ClientError> {
        let list = self.api.members(channel).await?;
        let users: Vec<&str> = list.members.iter().map(|m| m.user.as_str()).collect();
        let presence: HashMap<String, PresenceInfo> = self
            .api
            .presence(&users)
            .await?
            .presence
            .into_iter()
            .map(|p| (p.user.clone(), p))
            .collect();
        let now = now_ms();
        for member in &list.members {
            let role = match member.role {
                Role::Admin => "admin",
                Role::Member => "member",
            };
            let status = presence
                .get(&member.user)
                .map_or_else(|| "unknown".to_owned(), |p| describe_status(p, now));
            println!("  {:<32} {role:<6} {status}", member.user);
        }
        Ok(())
    }
}

/// Sleeps before a reconnect while still answering `/quit`, end of input and Ctrl-C.
async fn wait_offline(delay: Duration, input: &mut mpsc::Receiver<String>) -> Flow {
    let deadline = tokio::time::sleep(delay);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return Flow::Continue,
            line = input.recv() => match line.as_deref().map(parse_line) {
                None | Some(Ok(Some(Command::Quit))) => return Flow::Quit,
                Some(Ok(None)) => {}
                Some(_) => println!("! not connected; line ignored (/quit to stop)"),
            },
            _ = tokio::signal::ctrl_c() => return Flow::Quit,
        }
    }
}

/// Exponential backoff: 1, 2, 4, 8, 16, then 30 seconds.
fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_secs((1u64 << failures.saturating_sub(1).min(5)).min(30))
}

fn qualify(user: &str, domain: &str) -> String {
    if user.contains('@') || domain.is_empty() {
        user.to_owned()
    } else {
        format!("{user}@{domain}")
    }
}

fn members_text(count: usize) -> String {
    if count == 1 {
        "1 member".to_owned()
    } else {
        format!("{count} members")
    }
}

fn channel_label(channel: &ChannelSummary) -> String {
    match channel.kind {
        ChannelKind::Group => format!("#{}", channel.name),
        ChannelKind::Direct => format!("@{}", channel.name),
    }
}

/// `[12:03] bob@localhost: hi`, with the channel label after the time when the
/// event is not in the open conversation.
fn format_event(event: &Event, label: Option<&str>, now_ms: u64) -> String {
    let time = format_time(event.ts, now_ms);
    let label = label.map(|l| format!("{l} ")).unwrap_or_default();
    let what = match &event.content {
        EventContent::Message { body } => format!("{}: {body}", event.sender),
        EventContent::Membership {
            action, user, name, ..
        } => match action {
            MembershipAction::Create => match name {
                Some(name) => format!("* {} created the group \"{name}\"", event.sender),
                None => format!("* {} created the group", event.sender),
            },
            MembershipAction::Add => format!("* {} added {user}", event.sender),
            MembershipAction::Remove => format!("* {} removed {user}", event.sender),
            MembershipAction::Leave => format!("* {user} left"),
        },
    };
    format!("[{time}] {label}{what}")
}

fn describe_presence(presence: &PresenceInfo, now_ms: u64) -> String {
    format!("{} is {}", presence.user, describe_status(presence, now_ms))
}

fn describe_status(presence: &PresenceInfo, now_ms: u64) -> String {
    match (presence.status, presence.last_active_at) {
        (PresenceStatus::Online, _) => "online".to_owned(),
        (PresenceStatus::Offline, Some(at)) => {
            format!("offline (last active {})", format_time(at, now_ms))
        }
        (PresenceStatus::Offline, None) => "offline".to_owned(),
    }
}

const MS_PER_DAY: u64 = 86_400_000;

/// `HH:MM` (UTC) for today, `YYYY-MM-DD HH:MM` for other days.
fn format_time(ts_ms: u64, now_ms: u64) -> String {
    let day = ts_ms / MS_PER_DAY;
    let minutes = (ts_ms % MS_PER_DAY) / 60_000;
    let hm = format!("{:02}:{:02}", minutes / 60, minutes % 60);
    if day == now_ms / MS_PER_DAY {
        hm
    } else {
        let (y, m, d) = civil_from_days(day);
        format!("{y:04}-{m:02}-{d:02} {hm}")
    }
}

/// Calendar date of a day count since 1970-01-01 (Howard Hinnant's algorithm),
/// to avoid a date crate for one line of output.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An error and its causes on one line, e.g. `HTTP request failed: ...: Connection refused`.
fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source in their own message (tungstenite's Io).
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(content: EventContent, ts: u64) -> Event {
        Event {
            id: "e".into(),
            channel: "c@localhost".into(),
            sender: "bob@localhost".into(),
            origin: "localhost".into(),
            seq: 1,
            ts,
            pos: Some(1),
            content,
        }
    }

    #[test]
    fn lines_parse_into_commands() {
        assert_eq!(parse_line(""), Ok(None));
        assert_eq!(parse_line("   \r\n"), Ok(None));
        assert_eq!(
            parse_line("hello there\n"),
            Ok(Some(Command::Say("hello there".into())))
        );
        assert_eq!(
            parse_line("//shrug"),
            Ok(Some(Command::Say("/shrug".into())))
        );
        assert_eq!(parse_line("/list"), Ok(Some(Command::List)));
        assert_eq!(
            parse_line("/open bob"),
            Ok(Some(Command::Open("bob".into())))
        );
        assert_eq!(
            parse_line("/group team bob carol@other"),
            Ok(Some(Command::Group {
                name: "team".into(),
                members: vec!["bob".into(), "carol@other".into()]
            }))
        );
        assert_eq!(parse_line("/add bob"), Ok(Some(Command::Add("bob".into()))));
        assert_eq!(
            parse_line("/remove bob"),
            Ok(Some(Command::Remove("bob".into())))
        );
        assert_eq!(parse_line("/leave"), Ok(Some(Command::Leave)));
        assert_eq!(
            parse_line("/history"),
            Ok(Some(Command::History(DEFAULT_HISTORY)))
        );
        assert_eq!(parse_line("/history 5"), Ok(Some(Command::History(5))));
        assert_eq!(parse_line("/who"), Ok(Some(Command::Who)));
        assert_eq!(parse_line("/help"), Ok(Some(Command::Help)));
        assert_eq!(parse_line("/quit"), Ok(Some(Command::Quit)));
    }

    #[test]
    fn bad_commands_get_usage_hints() {
        assert!(parse_line("/open").unwrap_err().contains("usage"));
        assert!(parse_line("/open a b").unwrap_err().contains("usage"));
        assert!(parse_line("/group team").unwrap_err().contains("usage"));
        assert!(parse_line("/history 0").is_err());
        assert!(parse_line("/history many").is_err());
        assert!(parse_line("/leave now").is_err());
        assert!(parse_line("/frobnicate").unwrap_err().contains("/help"));
    }

    #[test]
    fn bare_usernames_are_qualified() {
        assert_eq!(qualify("bob", "localhost"), "bob@localhost");
        assert_eq!(qualify("bob@other", "localhost"), "bob@other");
        assert_eq!(qualify("bob", ""), "bob");
    }

    #[test]
    fn times_are_utc_with_a_date_on_other_days() {
        // 2023-11-14 22:13:20 UTC.
        let ts = 1_700_000_000_000;
        assert_eq!(format_time(ts, ts + 60_000), "22:13");
        assert_eq!(format_time(ts, ts + MS_PER_DAY), "2023-11-14 22:13");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_819), (2027, 1, 1));
    }

    #[test]
    fn events_print_as_chat_lines() {
        let ts = 1_700_000_000_000;
        let message = event(EventContent::Message { body: "hi".into() }, ts);
        assert_eq!(
            format_event(&message, None, ts),
            "[22:13] bob@localhost: hi"
        );
        assert_eq!(
            format_event(&message, Some("#team"), ts),
            "[22:13] #team bob@localhost: hi"
        );
        let create = event(
            EventContent::Membership {
                action: MembershipAction::Create,
                user: "bob@localhost".into(),
                version: 1,
                name: Some("team".into()),
            },
            ts,
        );
        assert_eq!(
            format_event(&create, None, ts),
            "[22:13] * bob@localhost created the group \"team\""
        );
        let add = event(
            EventContent::Membership {
                action: MembershipAction::Add,
                user: "carol@localhost".into(),
                version: 2,
                name: None,
            },
            ts,
        );
        assert_eq!(
            format_event(&add, None, ts),
            "[22:13] * bob@localhost added carol@localhost"
        );
        let leave = event(
            EventContent::Membership {
                action: MembershipAction::Leave,
                user: "carol@localhost".into(),
                version: 3,
                name: None,
            },
            ts,
        );
        assert_eq!(
            format_event(&leave, None, ts),
            "[22:13] * carol@localhost left"
        );
    }

    #[test]
    fn presence_reads_naturally() {
        let ts = 1_700_000_000_000;
        let online = PresenceInfo {
            user: "bob@localhost".into(),
            status: PresenceStatus::Online,
            last_active_at: Some(ts),
        };
        assert_eq!(describe_presence(&online, ts), "bob@localhost is online");
        let offline = PresenceInfo {
            status: PresenceStatus::Offline,
            ..online
        };
        assert_eq!(
            describe_presence(&offline, ts),
            "bob@localhost is offline (last active 22:13)"
        );
    }

    #[test]
    fn reconnect_delay_backs_off_to_thirty_seconds() {
        let delays: Vec<u64> = (1..=8).map(|n| reconnect_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn chat_args_do_not_print_the_password() {
        let args = ChatArgs {
            server: "http://x".into(),
            user: "alice".into(),
            password: Some("hunter22".into()),
            register: false,
            device_name: "d".into(),
            open: None,
            backlog: 20,
            token_file: None,
        };
        assert!(!format!("{args:?}").contains("hunter22"));
    }

    #[test]
    fn saved_sessions_round_trip_for_their_user_only() {
        let path = std::env::temp_dir().join(format!(
            "hearth-chat-test-{}-{}.json",
            std::process::id(),
            KeyGen::new().next_key()
        ));
        let session = Session {
            user: "alice@localhost".into(),
            device: "d1".into(),
            token: "secret".into(),
        };
        save_session(&path, &session).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = load_session(&path, "alice").unwrap();
        assert_eq!(loaded.token, "secret");
        assert!(load_session(&path, "alice@localhost").is_some());
        assert!(load_session(&path, "bob").is_none());
        std::fs::remove_file(&path).unwrap();
        assert!(load_session(&path, "alice").is_none());
    }

    #[test]
    fn seen_ids_are_bounded() {
        let mut seen = Seen::default();
        assert!(seen.insert("a"));
        assert!(!seen.insert("a"));
        for i in 0..SEEN_CAPACITY {
            seen.insert(&i.to_string());
        }
        assert_eq!(seen.ids.len(), SEEN_CAPACITY);
        // "a" was the oldest and has been forgotten.
        assert!(seen.insert("a"));
    }

    #[derive(clap::Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: TestCommand,
    }

    #[derive(clap::Subcommand)]
    enum TestCommand {
        Chat(ChatArgs),
    }

    #[test]
    fn chat_args_work_as_a_subcommand() {
        use clap::{CommandFactory, Parser};
        TestCli::command().debug_assert();
        let cli = TestCli::try_parse_from([
            "hearth",
            "chat",
            "--server",
            "http://127.0.0.1:9",
            "--user",
            "alice",
            "--password",
            "secret-password",
            "--register",
            "--open",
            "bob",
        ])
        .unwrap();
        let TestCommand::Chat(args) = cli.command;
        assert_eq!(args.user, "alice");
        assert!(args.register);
        assert_eq!(args.open.as_deref(), Some("bob"));
    }

    #[test]
    fn error_chains_print_on_one_line_without_repeats() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeating(#[source] std::io::Error);
        let io = || std::io::Error::other("refused");
        assert_eq!(describe(&Repeating(io())), "outer: refused");
        let error = ClientError::Decode(serde_json::from_str::<u8>("x").unwrap_err());
        assert!(describe(&error).starts_with("malformed response from server: expected value"));
    }
}
