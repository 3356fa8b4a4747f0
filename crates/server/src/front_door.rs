//! The front door: the accept loop and the life of every client connection.
//!
//! It owns what a client can cost before (or without) a valid key:
//! - a cap on open connections in total and per client address. At the total cap a new
//!   connection evicts the longest-idle one (no request in progress: never sent a byte,
//!   headers still arriving, or idle keep-alive); only when every connection is busy is the
//!   newcomer refused (503). Beyond the per-address cap, that address's own longest-idle
//!   connection is evicted, or the newcomer refused (429) when all of them are busy. So
//!   neither one address nor a crowd of idle connections from many can starve `/v1/health`
//!   or another account's invocations;
//! - timeouts on every phase of a connection: the headers (`header_timeout`, from the
//!   accept or from the first byte of a later request), the request body (`body_timeout`,
//!   a total deadline: a trickle is cut off with 408), sending the response (`body_timeout`
//!   again: a client that does not read is dropped), and idle keep-alive (`idle_timeout`);
//! - header size (`MAX_HEADER_BYTES`, 431 beyond it);
//! - accept errors (EMFILE, ENFILE, ENOBUFS, ...): backed off from 10 ms doubling to 1 s,
//!   logged at most once per `ACCEPT_LOG_EVERY`, and at EMFILE/ENFILE the longest-idle
//!   connection is evicted to give the file back.
//!
//! HTTP/1.1 only (hyper's `http1` connection, keep-alive on); the per-request bookkeeping
//! is a few atomic stores, so the warm path over one keep-alive connection is unchanged.
//!
//! Why the connection's own timer rather than hyper's `header_read_timeout`: hyper starts
//! that timer whenever it waits for a request head, idle keep-alive included, so it would
//! also close every idle keep-alive connection after the header timeout. Here the two are
//! separate (like nginx's `client_header_timeout` and `keepalive_timeout`), and the same
//! timer bounds the body and the sending of the response. Why not tower-http's
//! `RequestBodyTimeoutLayer`: its deadline restarts at every frame, so one byte a second
//! never trips it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::{Json, Router};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::Service;

/// Default `--header-timeout`: time to send a request's headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `--body-timeout`: time to send a request body, and to take a response.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `--idle-timeout`: how long a keep-alive connection may wait for its next request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The request line and headers together, at most (larger: 431). Bounds the memory a
/// connection can hold before it is authenticated.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// hyper's read (and queued write) buffer per connection, at most: a little over the
/// headers (its default, about 400 KiB, would let a client that sends large headers slowly
/// hold that much). Bodies stream through it in chunks.
const MAX_BUF_BYTES: usize = MAX_HEADER_BYTES + 8 * 1024;
/// Open files kept for the server itself whatever `--max-connections` says: the store
/// (SQLite database, WAL, shared memory, one per pooled connection), instances (pipes,
/// pidfds and cgroup files: about ten each), logs, the sandboxes' set-up. The default
/// keeps three quarters of the limit.
pub const MIN_RESERVED_FDS: u64 = 256;
/// The default `--max-connections` is a quarter of the open-file limit, at most this many
/// (memory: a connection costs about 10 KiB idle, up to `MAX_BUF_BYTES` more while its
/// headers arrive).
pub const DEFAULT_MAX_CONNECTIONS_CEILING: usize = 8192;
/// How often a failing accept is logged at most.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The operator's settings for the front door (`serve` flags of the same names).
#[derive(Debug, Clone)]
pub struct FrontDoorConfig {
    /// `--max-connections`: open client connections at once. `None`: a quarter of the
    /// open-file limit (raised to its hard limit at start), at most
    /// [`DEFAULT_MAX_CONNECTIONS_CEILING`].
    pub max_connections: Option<usize>,
    /// `--max-connections-per-ip`: open connections of one client address (IPv6: one /64).
    /// `None`: an eighth of the total cap.
    pub max_connections_per_ip: Option<usize>,
    /// `--header-timeout`: a request's headers must arrive within this, counted from the
    /// accept (first request) or from the request's first byte (later ones).
    pub header_timeout: Duration,
    /// `--body-timeout`: a request body must have arrived within this of its headers
    /// (else 408), and a response must be taken by the client within this.
    pub body_timeout: Duration,
    /// `--idle-timeout`: a keep-alive connection with no request is closed after this.
    pub idle_timeout: Duration,
}

impl Default for FrontDoorConfig {
    fn default() -> Self {
        FrontDoorConfig {
            max_connections: None,
            max_connections_per_ip: None,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The settings in force, checked against the open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    fn tick(&self) -> Duration {
        (self
            .header_timeout
            .min(self.idle_timeout)
            .min(self.body_timeout)
            / 2)
        .max(Duration::from_millis(10))
    }
}

impl FrontDoorConfig {
    /// The limits for a process allowed `open_files` descriptors, or what is wrong.
    pub(crate) fn resolve(&self, open_files: u64) -> Result<Limits, String> {
        for (flag, value) in [
            ("--header-timeout", self.header_timeout),
            ("--body-timeout", self.body_timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{flag} must be longer than 0s; e.g. {flag} 10s"));
            }
        }
        let budget = open_files.saturating_sub(MIN_RESERVED_FDS);
        let max_connections = match self.max_connections {
            Some(0) => {
                return Err("--max-connections must be at least 1".to_string());
            }
            Some(n) if u64::try_from(n).unwrap_or(u64::MAX) > budget => {
                return Err(format!(
                    "--max-connections {n} leaves too few open files for the server itself: the \
                     limit is {open_files} (RLIMIT_NOFILE, already raised to its hard limit) and \
                     {MIN_RESERVED_FDS} are kept for the store, instances and logs; use at most \
                     {budget}, or raise the hard limit (`ulimit -Hn`, systemd `LimitNOFILE=`)"
                ));
            }
            Some(n) => n,
            None => default_max_connections(open_files),
        };
        let max_connections_per_ip = match self.max_connections_per_ip {
            Some(0) => {
                return Err("--max-connections-per-ip must be at least 1".to_string());
            }
            Some(n) if n > max_connections => {
                return Err(format!(
                    "--max-connections-per-ip {n} is more than --max-connections \
                     {max_connections}; one address cannot have more than all of them"
                ));
            }
            Some(n) => n,
            None => (max_connections / 8).max(1),
        };
        Ok(Limits {
            max_connections,
            max_connections_per_ip,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            idle_timeout: self.idle_timeout,
        })
    }
}

/// A quarter of the open files, at most [`DEFAULT_MAX_CONNECTIONS_CEILING`]: the other
/// three quarters stay for the store, the instances and the logs.
fn default_max_connections(open_files: u64) -> usize {
    let quarter = open_files
        .saturating_sub(MIN_RESERVED_FDS)
        .min(open_files / 4);
    usize::try_from(quarter)
        .unwrap_or(usize::MAX)
        .clamp(1, DEFAULT_MAX_CONNECTIONS_CEILING)
}

/// Raises the soft open-file limit to the hard limit; returns the limit in force.
pub(crate) fn raise_open_files() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit; assuming 1024");
            return 1024;
        }
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(error) => {
            tracing::warn!(%error, soft, hard, "cannot raise the open-file limit to its hard limit");
            soft
        }
    }
}

// --- connections and their phases ------------------------------------------------------

/// Which client a connection counts against: an IPv4 address, or an IPv6 /64 (one host's
/// usual allocation; per /128 would be no limit at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4),
                None => ClientKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Waiting for a request's headers (after the accept, or since a later request's first
/// byte). Deadline: `header_timeout`. Evictable.
const HEAD: u8 = 0;
/// Keep-alive, no byte of the next request yet. Deadline: `idle_timeout`. Evictable.
const IDLE: u8 = 1;
/// The handler runs (reading the body has its own deadline). Busy.
const REQUEST: u8 = 2;
/// The response is being sent. Deadline: `body_timeout`. Busy.
const RESPONSE: u8 = 3;

/// Milliseconds are fine-grained enough for every deadline here.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One connection's state, shared by its task, its I/O, its requests and the registry.
struct Conn {
    phase: AtomicU8,
    /// When the current phase began (ms since `EPOCH`).
    since_ms: AtomicU64,
    /// The current request's body missed its deadline: its answer becomes 408.
    body_timed_out: AtomicBool,
    /// The registry chose this connection to make room.
    evict: Notify,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(now_ms()),
            body_timed_out: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    fn enter(&self, phase: u8) {
        self.since_ms.store(now_ms(), Ordering::Relaxed);
        self.phase.store(phase, Ordering::Release);
    }

    fn evictable(&self) -> bool {
        matches!(self.phase(), HEAD | IDLE)
    }

    /// When this connection's current phase runs out (`None`: the handler's phase has no
    /// deadline of its own).
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let phase = self.phase();
        let since = *EPOCH + Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        match phase {
            HEAD => Some(since + limits.header_timeout),
            IDLE => Some(since + limits.idle_timeout),
            RESPONSE => Some(since + limits.body_timeout),
            _ => None,
        }
    }

    /// When the connection's task should look again: the deadline, or sooner, because the
    /// phase may change meanwhile to one with an earlier deadline. Looking every half of
    /// the shortest timeout instead of being told of every change keeps the per-request
    /// path free of timers and wake-ups; a deadline is kept to within that half.
    fn next_check(&self, limits: &Limits) -> Instant {
        let soon = Instant::now() + limits.tick();
        self.deadline(limits)
            .map_or(soon, |deadline| deadline.min(soon))
    }

    fn expired(&self, limits: &Limits) -> bool {
        self.deadline(limits)
            .is_some_and(|deadline| Instant::now() >= deadline)
    }
}

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The address is at its cap and all of its connections are busy.
    PerClient { cap: usize },
    /// The server is at its cap and every connection is busy.
    Full { cap: usize },
}

struct Slot {
    client: ClientKey,
    conn: Arc<Conn>,
    evicting: bool,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, Slot>,
    by_client: HashMap<ClientKey, Vec<u64>>,
    /// Slots told to go that have not gone yet (not counted against the caps).
    evicting: usize,
}

impl Inner {
    /// The longest-idle evictable connection among `ids` not already told to go.
    fn oldest_idle(&self, ids: impl Iterator<Item = u64>) -> Option<u64> {
        ids.filter_map(|id| self.conns.get(&id).map(|slot| (id, slot)))
            .filter(|(_, slot)| !slot.evicting && slot.conn.evictable())
            .min_by_key(|(_, slot)| slot.conn.since_ms.load(Ordering::Relaxed))
            .map(|(id, _)| id)
    }

    fn evict(&mut self, id: u64) {
        if let Some(slot) = self.conns.get_mut(&id) {
            if !slot.evicting {
                slot.evicting = true;
                self.evicting += 1;
                slot.conn.evict.notify_one();
            }
        }
    }

    fn live(&self, client: ClientKey) -> usize {
        self.by_client.get(&client).map_or(0, |ids| {
            ids.iter()
                .filter(|id| self.conns.get(id).is_some_and(|slot| !slot.evicting))
                .count()
        })
    }
}

/// Every open connection, for the caps and eviction.
struct Registry {
    limits: Limits,
    inner: Mutex<Inner>,
}

impl Registry {
    fn new(limits: Limits) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes room for a connection from `ip` (evicting idle ones) and registers it.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        let client = ClientKey::of(ip);
        let mut inner = self.lock();
        let per_ip = self.limits.max_connections_per_ip;
        if inner.live(client) >= per_ip {
            let own = inner.by_client.get(&client).cloned().unwrap_or_default();
            match inner.oldest_idle(own.into_iter()) {
                Some(victim) => inner.evict(victim),
                None => return Err(Refusal::PerClient { cap: per_ip }),
            }
        }
        let max = self.limits.max_connections;
        if inner.conns.len() - inner.evicting >= max {
            let all: Vec<u64> = inner.conns.keys().copied().collect();
            match inner.oldest_idle(all.into_iter()) {
                Some(victim) => inner.evict(victim),
                None => return Err(Refusal::Full { cap: max }),
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let conn = Arc::new(Conn::new());
        inner.conns.insert(
            id,
            Slot {
                client,
                conn: conn.clone(),
                evicting: false,
            },
        );
        inner.by_client.entry(client).or_default().push(id);
        Ok(Admitted {
            id,
            conn,
            registry: self.clone(),
        })
    }

    /// At EMFILE/ENFILE: closes the longest-idle connection to give its file back.
    fn evict_one(&self) -> bool {
        let mut inner = self.lock();
        let all: Vec<u64> = inner.conns.keys().copied().collect();
        match inner.oldest_idle(all.into_iter()) {
            Some(victim) => {
                inner.evict(victim);
                true
            }
            None => false,
        }
    }

    /// A connection told to go had become busy: it stays, and counts again.
    fn keep(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(slot) = inner.conns.get_mut(&id) {
            if slot.evicting {
                slot.evicting = false;
                inner.evicting -= 1;
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut inner = self.lock();
        let Some(slot) = inner.conns.remove(&id) else {
            return;
        };
        if slot.evicting {
            inner.evicting -= 1;
        }
        if let Some(ids) = inner.by_client.get_mut(&slot.client) {
            ids.retain(|&other| other != id);
            if ids.is_empty() {
                inner.by_client.remove(&slot.client);
            }
        }
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        let inner = self.lock();
        inner.conns.len() - inner.evicting
    }
}

/// A registered connection; leaves the registry when dropped.
struct Admitted {
    id: u64,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

// --- the accept loop -----------------------------------------------------------------------

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting, closes
/// idle connections, lets busy ones finish their request, and returns when all are closed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let registry = Registry::new(limits);
    let mut http = http1::Builder::new();
    http.keep_alive(true)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_BUF_BYTES);
    let http = Arc::new(http);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                errors.succeeded();
                accepted
            }
            Err(error) => {
                let Some(pause) = errors.failed(&error) else {
                    continue;
                };
                if matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    registry.evict_one();
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        match registry.admit(peer.ip()) {
            Ok(admitted) => {
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_connection(
                    stream,
                    peer,
                    admitted,
                    router.clone(),
                    http.clone(),
                    stop_rx.clone(),
                ));
            }
            Err(refusal) => refuse(stream, peer, refusal),
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// Answers a turned-away connection with a short error (best effort: only what fits in the
/// socket's buffer now) and closes it.
fn refuse(stream: TcpStream, peer: SocketAddr, refusal: Refusal) {
    let (status, message) = match refusal {
        Refusal::PerClient { cap } => (
            "429 Too Many Requests",
            format!(
                "too many connections from {}: all {cap} allowed (--max-connections-per-ip) \
                 are busy; reuse keep-alive connections instead of opening new ones, or retry \
                 when one is done",
                peer.ip()
            ),
        ),
        Refusal::Full { cap } => (
            "503 Service Unavailable",
            format!(
                "the server is at its connection limit (--max-connections {cap}) and every \
                 connection is busy; retry shortly"
            ),
        ),
    };
    tracing::debug!(%peer, ?refusal, "connection refused");
    let body =
        json!({ "error": { "code": "too_many_connections", "message": message } }).to_string();
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // A std socket writes at once (tokio's would first wait for the reactor to see it
    // writable); the socket is already non-blocking, so this never waits.
    if let Ok(mut stream) = stream.into_std() {
        let _ = io::Write::write(&mut stream, reply.as_bytes());
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

/// Accept failures: the back-off, and a log line at most every `ACCEPT_LOG_EVERY`.
#[derive(Debug, Default)]
struct AcceptErrors {
    backoff: Option<Duration>,
    last_logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn succeeded(&mut self) {
        self.backoff = None;
    }

    /// Logs (rate-limited); returns how long to pause before accepting again, or `None`
    /// for an error of that one connection (aborted before it was accepted: retrying at
    /// once is right, and pausing would let such a flood stall everyone).
    fn failed(&mut self, error: &io::Error) -> Option<Duration> {
        let transient = matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::Interrupted
        ) || matches!(error.raw_os_error(), Some(libc::EPROTO | libc::EPERM));
        let pause = (!transient).then(|| {
            let next = self
                .backoff
                .map_or(ACCEPT_BACKOFF_MIN, |b| (b * 2).min(ACCEPT_BACKOFF_MAX));
            self.backoff = Some(next);
            next
        });
        let due = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY);
        if due {
            let earlier = std::mem::take(&mut self.unlogged);
            self.last_logged = Some(std::time::Instant::now());
            if transient {
                tracing::debug!(%error, earlier, "accept error of one connection");
            } else {
                tracing::error!(
                    %error,
                    "accept error (and {earlier} more in the last {}s); pausing accepts for {} ms; \
                     if it says too many open files, raise the hard limit (ulimit -Hn) or lower \
                     --max-connections",
                    ACCEPT_LOG_EVERY.as_secs(),
                    pause.unwrap_or_default().as_millis()
                );
            }
        } else {
            self.unlogged += 1;
        }
        pause
    }
}

// --- one connection ------------------------------------------------------------------------

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    router: Router,
    http: Arc<http1::Builder>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = admitted.registry.limits;
    let conn = admitted.conn.clone();
    let io = TokioIo::new(Tracked {
        stream,
        conn: conn.clone(),
    });
    let service = ConnService {
        router,
        peer,
        conn: conn.clone(),
        body_timeout: limits.body_timeout,
    };
    let connection = http.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let wake = conn.next_check(&limits);
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = conn.evict.notified() => {
                if conn.evictable() {
                    tracing::debug!("idle connection evicted to make room");
                    return;
                }
                admitted.registry.keep(admitted.id);
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                if conn.evictable() {
                    return;
                }
                // Finishes the request in progress, then closes.
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(wake) => {
                if conn.expired(&limits) {
                    tracing::debug!(phase = conn.phase(), "connection timed out");
                    return;
                }
            }
        }
    }
}

/// The socket, noting the first byte of a request that follows an idle spell.
struct Tracked {
    stream: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before && this.conn.phase() == IDLE {
            this.conn.enter(HEAD);
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Runs the router for one connection's requests, keeping the connection's phase.
#[derive(Clone)]
struct ConnService {
    router: Router,
    /// The client's address, given to handlers as axum's `ConnectInfo`.
    peer: SocketAddr,
    conn: Arc<Conn>,
    body_timeout: Duration,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, request: Request<Incoming>) -> BoxFuture {
        self.conn.enter(REQUEST);
        self.conn.body_timed_out.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + self.body_timeout;
        let conn = self.conn.clone();
        let body_timeout = self.body_timeout;
        let mut request = request;
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        let request = request.map(|body| {
            Body::new(DeadlineBody {
                body,
                deadline,
                sleep: None,
                timeout: body_timeout,
                conn: conn.clone(),
                failed: false,
            })
        });
        let mut router = self.router.clone();
        Box::pin(async move {
            // A Router is always ready (its `poll_ready` is `Ready(Ok(()))`).
            let response = match router.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let response = if conn.body_timed_out.load(Ordering::Relaxed) {
                body_timeout_response(body_timeout)
            } else {
                response
            };
            conn.enter(RESPONSE);
            Ok(response.map(|body| Body::new(SendingBody { body, conn })))
        })
    }
}

/// The 408 a request gets when its body is not in by the deadline.
fn body_timeout_response(timeout: Duration) -> Response<Body> {
    let message = format!(
        "the request body did not arrive within {} of its headers (the server's \
         --body-timeout); send the whole body promptly, or ask the operator for a longer \
         --body-timeout",
        humantime::format_duration(timeout)
    );
    let mut response = (
        StatusCode::REQUEST_TIMEOUT,
        Json(json!({ "error": { "code": "request_timeout", "message": message } })),
    )
        .into_response();
    // The rest of the body may still be on its way: this connection is done.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the request body did not arrive within {} (--body-timeout)", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error(transparent)]
    Read(#[from] hyper::Error),
}

/// A request body with a total deadline (not one per frame). The timer is only created
/// when the body is not already all there.
struct DeadlineBody {
    body: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    conn: Arc<Conn>,
    failed: bool,
}

impl DeadlineBody {
    fn time_out(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.failed = true;
        self.conn.body_timed_out.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(BodyError::TimedOut(self.timeout))))
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                if this.sleep.as_ref().is_some_and(|s| s.is_elapsed()) {
                    return this.time_out();
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Read)))
            }
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => this.time_out(),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body; the connection is idle again once it is sent (or dropped).
struct SendingBody {
    body: Body,
    conn: Arc<Conn>,
}

impl http_body::Body for SendingBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for SendingBody {
    fn drop(&mut self) {
        if self.conn.phase() == RESPONSE {
            self.conn.enter(IDLE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: usize) -> Limits {
        FrontDoorConfig {
            max_connections: Some(max),
            max_connections_per_ip: Some(per_ip),
            ..FrontDoorConfig::default()
        }
        .resolve(1 << 20)
        .expect("valid")
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn defaults_follow_the_open_file_limit() {
        let config = FrontDoorConfig::default();
        let big = config.resolve(1 << 20).expect("valid");
        assert_eq!(big.max_connections, DEFAULT_MAX_CONNECTIONS_CEILING);
        assert_eq!(
            big.max_connections_per_ip,
            DEFAULT_MAX_CONNECTIONS_CEILING / 8
        );
        let small = config.resolve(4096).expect("valid");
        assert_eq!(small.max_connections, 1024);
        assert_eq!(small.max_connections_per_ip, 128);
        let low = config.resolve(1024).expect("valid");
        assert_eq!(low.max_connections, 256);
        // Even a tiny limit keeps MIN_RESERVED_FDS for the server.
        let tiny = config.resolve(300).expect("valid");
        assert_eq!(tiny.max_connections, 44);
    }

    #[test]
    fn bad_settings_say_what_to_do() {
        let over = FrontDoorConfig {
            max_connections: Some(5000),
            ..FrontDoorConfig::default()
        };
        let error = over.resolve(4096).expect_err("too many");
        assert!(error.contains("at most 3840"), "{error}");
        assert!(error.contains("ulimit -Hn"), "{error}");
        let per_ip = FrontDoorConfig {
            max_connections: Some(10),
            max_connections_per_ip: Some(11),
            ..FrontDoorConfig::default()
        };
        assert!(per_ip
            .resolve(1 << 20)
            .expect_err("per ip")
            .contains("--max-connections-per-ip 11"));
        let zero = FrontDoorConfig {
            idle_timeout: Duration::ZERO,
            ..FrontDoorConfig::default()
        };
        assert!(zero
            .resolve(1 << 20)
            .expect_err("zero")
            .contains("--idle-timeout"));
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(ClientKey::of(a), ClientKey::of(b));
        assert_ne!(ClientKey::of(a), ClientKey::of(c));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
        assert_eq!(ClientKey::of(mapped), ClientKey::of(ip(1)));
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_goes_and_busy_ones_stay() {
        let registry = Registry::new(limits(3, 2));
        let a = registry.admit(ip(1)).expect("a");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let b = registry.admit(ip(2)).expect("b");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let c = registry.admit(ip(3)).expect("c");
        // Full: the oldest idle (a) is told to go, the newcomer admitted.
        let d = registry.admit(ip(4)).expect("d");
        assert!(a.conn.evict.notified().now_or_never_is_ready());
        assert_eq!(registry.open(), 3);
        drop(a);
        // All busy: refused.
        for conn in [&b, &c, &d] {
            conn.conn.enter(REQUEST);
        }
        assert_eq!(registry.admit(ip(5)).err(), Some(Refusal::Full { cap: 3 }));
        // One idle again: it makes room.
        c.conn.enter(IDLE);
        let _e = registry.admit(ip(5)).expect("e");
        assert!(c.conn.evict.notified().now_or_never_is_ready());
    }

    #[tokio::test]
    async fn one_address_evicts_only_its_own() {
        let registry = Registry::new(limits(10, 2));
        let other = registry.admit(ip(9)).expect("other");
        let first = registry.admit(ip(1)).expect("first");
        let second = registry.admit(ip(1)).expect("second");
        let _third = registry.admit(ip(1)).expect("third evicts one of its own");
        assert!(!other.conn.evict.notified().now_or_never_is_ready());
        assert!(
            first.conn.evict.notified().now_or_never_is_ready()
                || second.conn.evict.notified().now_or_never_is_ready()
        );
        drop(first);
        drop(second);
        let busy = registry.admit(ip(1)).expect("fourth");
        busy.conn.enter(REQUEST);
        _third.conn.enter(REQUEST);
        assert_eq!(
            registry.admit(ip(1)).err(),
            Some(Refusal::PerClient { cap: 2 })
        );
        // Others are not affected.
        let _fine = registry.admit(ip(7)).expect("another address");
    }

    #[test]
    fn accept_errors_back_off_and_log_rarely() {
        let mut errors = AcceptErrors::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<Duration> = (0..9)
            .map(|_| errors.failed(&emfile).expect("pause"))
            .collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert_eq!(pauses[8], Duration::from_secs(1));
        // Logged once, the rest counted for the next line.
        assert_eq!(errors.unlogged, 8);
        errors.succeeded();
        assert_eq!(errors.failed(&emfile), Some(Duration::from_millis(10)));
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(errors.failed(&aborted), None);
    }

    trait NowOrNever {
        fn now_or_never_is_ready(self) -> bool;
    }

    impl<F: Future> NowOrNever for F {
        /// Whether the future is ready at its first poll.
        fn now_or_never_is_ready(self) -> bool {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            let mut future = std::pin::pin!(self);
            future.as_mut().poll(&mut cx).is_ready()
        }
    }
}
