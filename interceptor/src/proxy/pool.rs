//! Pooled HBONE tunnels of one pod: connections to the same destination pod share a mutual-TLS
//! tunnel, one HTTP/2 stream each.
//!
//! Every pod has its own pool ([`super::PodProxy::pool`]), so a tunnel carries exactly one
//! client identity: a tunnel opened for pod A never carries pod B's connections, because B
//! cannot reach A's pool. Within a pod's pool, tunnels are keyed by the destination's identity
//! and tunnel address (ztunnel's pool key, less the source, which the pool already fixes).
//!
//! - A new stream goes to the key's tunnel with the fewest streams. While every tunnel has a
//!   stream, streams spread over up to [`PoolLimits::spread`] tunnels, because one tunnel's
//!   encryption runs on one thread: several busy connections to one pod would otherwise share
//!   one core. A tunnel carries at most [`PoolLimits::max_streams`] streams at once; past
//!   that, another tunnel is opened. Tunnels to one key are opened one at a time, so a burst
//!   of connects to a new destination waits for one handshake and shares its tunnel.
//! - A tunnel without streams for [`PoolLimits::idle_timeout`] is closed (HTTP/2 GOAWAY).
//! - A renewed certificate retires the tunnels made with the old one: they take no new
//!   streams and close once their last stream ends, so no connection is cut.
//! - A tunnel that fails (its TCP connection reset, its peer gone) fails all of its streams
//!   with an error, which the relays turn into resets for the apps: never a hang. TCP
//!   keepalive and a user timeout bound how long a silent peer can go unnoticed.

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use interceptor_common::TUNNEL_PORT;
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::TcpStream;
use tracing::debug;

use super::{PodProxy, hbone, relay::ReadAhead, stream::H2Stream};
use crate::{identity::Identity, sync::lock, tls};

/// Limits of a pod's tunnel pool (agent flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// Streams one tunnel carries at once.
    pub max_streams: usize,
    /// Tunnels that busy streams to one destination spread over (1: always one tunnel).
    pub spread: usize,
    /// How long a tunnel without streams stays open.
    pub idle_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_streams: 100,
            spread: 2,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A silent tunnel peer is noticed after at most this long: keepalive probes start after
/// [`KEEPALIVE_IDLE`], and unacknowledged data fails the connection after this.
const USER_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle time before the first keepalive probe on a tunnel's TCP connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);

/// Counters of one pod's tunnels, for `/metrics`.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Tunnels opened.
    pub opened: AtomicU64,
    /// Streams opened over them.
    pub streams: AtomicU64,
    /// Tunnels open now.
    pub open: AtomicU64,
}

/// Where a pooled stream goes: the destination's identity and agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    identity: Identity,
    tunnel: SocketAddrV4,
}

type Tunnels = Mutex<HashMap<PoolKey, Vec<Arc<Tunnel>>>>;

/// One pod's tunnels.
pub struct TunnelPool {
    limits: PoolLimits,
    tunnels: Arc<Tunnels>,
    /// One opener per key at a time.
    opening: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    counters: Arc<TunnelCounters>,
}

/// One open tunnel: an HTTP/2 connection over mutual TLS.
struct Tunnel {
    sender: SendRequest<Bytes>,
    /// Streams open on it now (leases).
    streams: AtomicUsize,
    /// The certificate generation it was made with.
    generation: u64,
    /// Serial number of the certificate the destination agent presented.
    peer_certificate_serial: Option<String>,
    /// Set when the connection has ended; it takes no more streams.
    closed: AtomicBool,
    /// When its last stream ended.
    idle_since: Mutex<Instant>,
}

/// A stream's place on its tunnel: counted until dropped.
pub struct Lease {
    tunnel: Arc<Tunnel>,
}

impl Lease {
    /// Serial number of the certificate the destination agent presented on this tunnel.
    pub fn peer_certificate_serial(&self) -> Option<&str> {
        self.tunnel.peer_certificate_serial.as_deref()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.tunnel.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.tunnel.idle_since) = Instant::now();
        }
    }
}

/// Why a stream could not be opened.
enum StreamError {
    /// The request never left: the tunnel was already closing. Another tunnel may serve it.
    NotSent(String),
    /// The request was sent and failed, or the destination agent refused it.
    Failed(String),
}

impl TunnelPool {
    /// An empty pool that counts into `counters`.
    pub fn new(limits: PoolLimits, counters: Arc<TunnelCounters>) -> Self {
        Self {
            limits,
            tunnels: Arc::default(),
            opening: Mutex::default(),
            counters,
        }
    }

    /// Opens a stream to `destination`, whose agent must present `identity`, on a pooled
    /// tunnel or a new one; `source` is the calling app's address. The error says why, for
    /// the connection's record.
    pub async fn stream(
        &self,
        pod: &PodProxy,
        identity: &Identity,
        destination: SocketAddrV4,
        source: SocketAddr,
    ) -> Result<H2Stream, String> {
        let key = PoolKey {
            identity: identity.clone(),
            tunnel: SocketAddrV4::new(*destination.ip(), TUNNEL_PORT),
        };
        // A pooled tunnel may be closing without knowing it yet: then a fresh one is tried.
        let mut last_error = String::new();
        for _ in 0..2 {
            let lease = match self.pooled(&key, pod.tls.generation()) {
                Some(lease) => lease,
                None => self.open(&key, pod).await?,
            };
            let tunnel = lease.tunnel.clone();
            let request = hbone::connect_request(destination, source, &pod.workload);
            match open_stream(lease, request).await {
                Ok(stream) => {
                    self.counters.streams.fetch_add(1, Ordering::Relaxed);
                    return Ok(stream);
                }
                Err(StreamError::NotSent(error)) => {
                    tunnel.closed.store(true, Ordering::Release);
                    last_error = error;
                }
                Err(StreamError::Failed(error)) => return Err(error),
            }
        }
        Err(last_error)
    }

    /// A lease on the open tunnel of the current certificate generation with the fewest
    /// streams, unless it is full, or busy while fewer than `spread` tunnels are open: then
    /// `None`, and the caller opens another. Tunnels that are closed or of an older
    /// generation leave the pool.
    fn pooled(&self, key: &PoolKey, generation: u64) -> Option<Lease> {
        let mut tunnels = lock(&self.tunnels);
        let list = tunnels.get_mut(key)?;
        list.retain(|tunnel| {
            !tunnel.closed.load(Ordering::Acquire) && tunnel.generation == generation
        });
        let open = list.len();
        let found = list
            .iter()
            .min_by_key(|tunnel| tunnel.streams.load(Ordering::Acquire))
            .filter(|least| {
                let streams = least.streams.load(Ordering::Acquire);
                streams < self.limits.max_streams && (streams == 0 || open >= self.limits.spread)
            })
            .map(|least| {
                least.streams.fetch_add(1, Ordering::AcqRel);
                Lease {
                    tunnel: least.clone(),
                }
            });
        if list.is_empty() {
            tunnels.remove(key);
        }
        found
    }

    /// Opens a tunnel to `key` (or takes one another task opened meanwhile), with a lease on it.
    async fn open(&self, key: &PoolKey, pod: &PodProxy) -> Result<Lease, String> {
        let gate = lock(&self.opening).entry(key.clone()).or_default().clone();
        let opened = {
            let _turn = gate.lock().await;
            match self.pooled(key, pod.tls.generation()) {
                Some(lease) => Ok(lease),
                None => self.connect(key, pod).await,
            }
        };
        let mut opening = lock(&self.opening);
        // Ours and the map's: nobody else is waiting on this key.
        if Arc::strong_count(&gate) == 2 {
            opening.remove(key);
        }
        opened
    }

    /// Connects, authenticates and starts a new tunnel, with a lease on it.
    async fn connect(&self, key: &PoolKey, pod: &PodProxy) -> Result<Lease, String> {
        let (config, generation) = pod.tls.client();
        let tcp = pod
            .netns
            .connect(key.tunnel)
            .await
            .map_err(|e| format!("connecting to the destination agent: {e}"))?;
        keep_alive(&tcp);
        let (tls, _) = tls::connect(config, &key.identity, ReadAhead::new(tcp))
            .await
            .map_err(|e| format!("mutual TLS with the destination agent: {e}"))?;
        let peer_certificate_serial = tls::peer_certificate_serial(tls.get_ref().1).ok();
        let (sender, connection) = hbone::client_builder(self.limits.max_streams)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("HTTP/2 with the destination agent: {e}"))?;
        let tunnel = Arc::new(Tunnel {
            sender,
            streams: AtomicUsize::new(1),
            generation,
            peer_certificate_serial,
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        });
        lock(&self.tunnels)
            .entry(key.clone())
            .or_default()
            .push(tunnel.clone());
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive(
            connection,
            Arc::downgrade(&tunnel),
            Arc::downgrade(&self.tunnels),
            key.clone(),
            self.limits.idle_timeout,
            self.counters.clone(),
        ));
        Ok(Lease { tunnel })
    }
}

/// Sends the CONNECT request on a leased tunnel and waits for its answer.
async fn open_stream(lease: Lease, request: http::Request<()>) -> Result<H2Stream, StreamError> {
    let sender = lease.tunnel.sender.clone();
    let mut sender = sender
        .ready()
        .await
        .map_err(|e| StreamError::NotSent(format!("tunnel closed: {e}")))?;
    let (response, send) = sender
        .send_request(request, false)
        .map_err(|e| StreamError::NotSent(format!("tunnel closed: {e}")))?;
    let response = response
        .await
        .map_err(|e| StreamError::Failed(format!("tunnel request: {e}")))?;
    if response.status() != http::StatusCode::OK {
        return Err(StreamError::Failed(hbone::Outcome::describe_status(
            response.status(),
        )));
    }
    Ok(H2Stream::new(send, response.into_body(), Some(lease)))
}

/// Runs a tunnel's HTTP/2 connection until it ends; closes it once idle past `idle_timeout`
/// by letting the pool drop it (the connection then sends GOAWAY and ends).
async fn drive<C>(
    connection: C,
    tunnel: Weak<Tunnel>,
    tunnels: Weak<Tunnels>,
    key: PoolKey,
    idle_timeout: Duration,
    counters: Arc<TunnelCounters>,
) where
    C: Future<Output = Result<(), h2::Error>>,
{
    let mut connection = std::pin::pin!(connection);
    let mut check = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            ended = &mut connection => {
                if let Err(e) = ended {
                    debug!(destination = %key.tunnel, "tunnel ended: {e}");
                }
                break;
            }
            _ = check.tick() => {
                if let Some(open) = tunnel.upgrade()
                    && open.streams.load(Ordering::Acquire) == 0
                    && lock(&open.idle_since).elapsed() >= idle_timeout
                {
                    debug!(destination = %key.tunnel, "closing idle tunnel");
                    forget(&tunnels, &key, &open);
                }
            }
        }
    }
    if let Some(ended) = tunnel.upgrade() {
        ended.closed.store(true, Ordering::Release);
        forget(&tunnels, &key, &ended);
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);
}

/// Takes `tunnel` out of the pool, so no new stream uses it.
fn forget(tunnels: &Weak<Tunnels>, key: &PoolKey, tunnel: &Arc<Tunnel>) {
    let Some(tunnels) = tunnels.upgrade() else {
        return;
    };
    let mut tunnels = lock(&tunnels);
    if let Some(list) = tunnels.get_mut(key) {
        list.retain(|other| !Arc::ptr_eq(other, tunnel));
        if list.is_empty() {
            tunnels.remove(key);
        }
    }
}

/// Keepalive and a user timeout on a tunnel's TCP connection, so a peer that vanished without
/// a reset fails the tunnel (and so its streams) instead of leaving them hanging.
pub(super) fn keep_alive(tcp: &TcpStream) {
    let fd = tcp.as_fd();
    let _ = setsockopt(&fd, sockopt::KeepAlive, &true);
    let _ = setsockopt(
        &fd,
        sockopt::TcpKeepIdle,
        &(KEEPALIVE_IDLE.as_secs() as u32),
    );
    let _ = setsockopt(&fd, sockopt::TcpKeepInterval, &2);
    let _ = setsockopt(&fd, sockopt::TcpKeepCount, &3);
    let _ = setsockopt(
        &fd,
        sockopt::TcpUserTimeout,
        &(USER_TIMEOUT.as_millis() as u32),
    );
}

/// Every pod's tunnel counters, for `/metrics`; a pod's counters outlive its removal, as
/// counters do.
#[derive(Debug, Default)]
pub struct TunnelMetrics {
    by_workload:
        Mutex<std::collections::BTreeMap<crate::workloads::WorkloadKey, Arc<TunnelCounters>>>,
}

/// One pod's tunnel figures at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelFigures {
    /// The pod.
    pub workload: crate::workloads::WorkloadKey,
    /// Tunnels opened.
    pub opened: u64,
    /// Streams opened over them.
    pub streams: u64,
    /// Tunnels open now.
    pub open: u64,
}

impl TunnelMetrics {
    /// The counters of `workload`'s pool, created on first use.
    pub fn for_workload(&self, workload: &crate::workloads::WorkloadKey) -> Arc<TunnelCounters> {
        lock(&self.by_workload)
            .entry(workload.clone())
            .or_default()
            .clone()
    }

    /// Every pod's figures, by pod.
    pub fn snapshot(&self) -> Vec<TunnelFigures> {
        lock(&self.by_workload)
            .iter()
            .map(|(workload, counters)| TunnelFigures {
                workload: workload.clone(),
                opened: counters.opened.load(Ordering::Relaxed),
                streams: counters.streams.load(Ordering::Relaxed),
                open: counters.open.load(Ordering::Relaxed),
            })
            .collect()
    }
}
