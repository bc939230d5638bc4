//! Loads interceptor-ebpf, attaches it, and owns the maps the agent reads and writes.
//!
//! Maps are pinned under `<bpf_dir>/maps` and links under `<bpf_dir>/links`, so capture and
//! STRICT enforcement keep working while the agent is down. A restarted agent reuses the pinned
//! maps and keeps links that are already pinned.
//!
//! Before anything is attached, [`Kernel::load`] writes the agent's own cgroup id into
//! `AGENT_CGROUP`, so capture never takes the agent's own sockets in pods, even when the agent
//! runs inside the pods cgroup (a DaemonSet's pod does). A restarted agent is in a new cgroup
//! and writes its new id before it makes any socket in a pod.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::admin::protocol::KernelCounters;
use crate::policy::Mode;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use interceptor_common::{COUNTERS, InboundKey, KernelEvent, OriginalDst, PodPortKey};

/// The compiled eBPF object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

const CONNECT4: &str = "redirect_connect4";
const SOCK_OPS: &str = "observe_sock_ops";
const POD_DOOR: &str = "pod_door";

/// Errors from loading, attaching or using the kernel programs.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The object could not be loaded (verifier, permissions, bpffs).
    #[error("loading the eBPF programs (are you root, is bpffs mounted?): {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("eBPF program `{name}`: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        source: aya::programs::ProgramError,
    },
    /// A map is missing from the object or has the wrong type.
    #[error("eBPF map `{name}`: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        source: aya::maps::MapError,
    },
    /// A link could not be pinned or opened.
    #[error("eBPF link pin {path}: {message}")]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// The agent's own cgroup, which capture must leave alone, could not be found.
    #[error("finding the agent's own cgroup, whose connects capture must leave alone")]
    OwnCgroup(#[from] crate::cgroup::OwnCgroupError),
    /// A file (cgroup, netns, pin directory) could not be opened.
    #[error("{path}: {source}")]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Loads a cgroup program and, unless a previous agent's pinned link is still there, attaches
/// it to the pods' cgroup and pins the link. A macro because aya's cgroup program types share
/// these methods without sharing a trait.
macro_rules! attach_to_cgroup {
    ($bpf:expr, $program:ty, $name:expr, $cgroup:expr, $pin:expr) => {{
        let pin: &Path = $pin;
        let prog = program::<$program>($bpf, $name)?;
        let err = |source| EbpfError::Program {
            name: $name,
            source,
        };
        prog.load().map_err(err)?;
        if pin.exists() {
            Ok(())
        } else {
            // bpf_link attachments to a cgroup always stack; "Single" means no legacy flags.
            let id = prog
                .attach($cgroup, CgroupAttachMode::Single)
                .map_err(err)?;
            let link = prog.take_link(id).map_err(err)?;
            pin_link(FdLink::try_from(link).map_err(|e| pin_error(pin, e))?, pin)
        }
    }};
}

/// The loaded programs and the maps enrolment and policy write.
pub struct Kernel {
    bpf: Ebpf,
    links_dir: PathBuf,
    enrolled: HashMap<MapData, u64, u32>,
    inbound_mode: HashMap<MapData, InboundKey, u32>,
}

/// Everything [`Kernel::load`] gives: the agent keeps the writer, and hands the narrow
/// handles to whoever reads them, so no reader shares the writer's lock.
pub struct LoadedKernel {
    /// Enrolment and inbound modes (the agent's).
    pub kernel: Kernel,
    /// Original destinations of redirected connects (the outbound proxy's).
    pub original_dsts: OriginalDsts,
    /// The per-CPU counters (metrics' and status').
    pub counters: CounterReader,
    /// The kernel events (the event reader's).
    pub events: EventReader,
}

/// Reads the kernel programs' events from their ring buffer, decoded.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    /// Starts reading: registers the ring buffer with the async runtime.
    pub fn start(self) -> std::io::Result<EventStream> {
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd as long as it does.
        let ring = unsafe { tokio::io::unix::AsyncFd::register(self.ring) }?;
        Ok(EventStream { ring, ready: true })
    }
}

/// Decoded kernel events as they arrive; see [`EventReader::start`].
pub struct EventStream {
    ring: tokio::io::unix::AsyncFd<RingBuf<MapData>>,
    /// Whether to drain before waiting (at start, events of a downtime are already there).
    ready: bool,
}

impl EventStream {
    /// The next events, oldest first; waits until there are some.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<KernelEvent>> {
        loop {
            if self.ready {
                let batch = drain(self.ring.get_mut());
                if !batch.is_empty() {
                    return Ok(batch);
                }
                self.ready = false;
            }
            self.ring.readable_mut().await?.clear_ready();
            self.ready = true;
        }
    }
}

/// Every complete event now in the ring.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<KernelEvent> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<KernelEvent>() {
            // SAFETY: the kernel wrote a KernelEvent; read_unaligned copes with any alignment.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<KernelEvent>()) });
        }
    }
    batch
}

/// The original destinations connect4 saved, keyed by pod and client port.
pub struct OriginalDsts {
    // Its own lock, held for one lookup-and-delete: aya's `remove` takes `&mut`.
    map: Mutex<HashMap<MapData, PodPortKey, OriginalDst>>,
}

impl OriginalDsts {
    /// Takes the original destination of a redirected connection, found by the pod's network
    /// namespace and the client's local port.
    pub fn take(&self, netns_cookie: u64, port: u16) -> Option<SocketAddrV4> {
        let key = PodPortKey {
            netns_cookie,
            port,
            _pad: [0; 6],
        };
        let mut map = crate::sync::lock(&self.map);
        let dst = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(dst.ip4)),
            dst.port,
        ))
    }
}

/// Reads the kernel programs' per-CPU counters.
pub struct CounterReader {
    counters: PerCpuArray<MapData, u64>,
}

impl CounterReader {
    /// Current totals of the kernel counters.
    pub fn read(&self) -> KernelCounters {
        let total = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        debug_assert_eq!(COUNTERS, 4);
        KernelCounters {
            redirected: total(interceptor_common::COUNTER_REDIRECTED),
            strict_drops: total(interceptor_common::COUNTER_STRICT_DROPS),
            events_lost: total(interceptor_common::COUNTER_EVENTS_LOST),
            plaintext_accepted: total(interceptor_common::COUNTER_PLAINTEXT_ACCEPTED),
        }
    }
}

impl Kernel {
    /// Loads the programs with maps pinned under `bpf_dir` and attaches capture to the pods'
    /// cgroup (unless a previous agent's pinned links are still there).
    pub fn load(bpf_dir: &Path, pods_cgroup: &Path) -> Result<LoadedKernel, EbpfError> {
        let maps_dir = bpf_dir.join("maps");
        let links_dir = bpf_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| EbpfError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)?;
        set_agent_cgroup(&mut bpf)?;
        let cgroup = File::open(pods_cgroup).map_err(|source| EbpfError::Io {
            path: pods_cgroup.to_owned(),
            source,
        })?;
        attach_to_cgroup!(
            &mut bpf,
            CgroupSockAddr,
            CONNECT4,
            &cgroup,
            &links_dir.join("connect4")
        )?;
        attach_to_cgroup!(
            &mut bpf,
            SockOps,
            SOCK_OPS,
            &cgroup,
            &links_dir.join("sock_ops")
        )?;
        program::<SkLookup>(&mut bpf, POD_DOOR)?
            .load()
            .map_err(|source| EbpfError::Program {
                name: POD_DOOR,
                source,
            })?;
        Ok(LoadedKernel {
            original_dsts: OriginalDsts {
                map: Mutex::new(take_map(&mut bpf, "ORIG_BY_PORT")?),
            },
            counters: CounterReader {
                counters: take_map(&mut bpf, "COUNTERS")?,
            },
            events: EventReader {
                ring: take_map(&mut bpf, "EVENTS")?,
            },
            kernel: Kernel {
                enrolled: take_map(&mut bpf, "ENROLLED")?,
                inbound_mode: take_map(&mut bpf, "INBOUND_MODE")?,
                links_dir,
                bpf,
            },
        })
    }

    /// Starts capture for a pod's network namespace and attaches its inbound door.
    pub fn enroll(&mut self, netns_cookie: u64, netns: &Path) -> Result<(), EbpfError> {
        let pin = self.links_dir.join(format!("pod-door-{netns_cookie}"));
        if !pin.exists() {
            let netns_file = File::open(netns).map_err(|source| EbpfError::Io {
                path: netns.to_owned(),
                source,
            })?;
            let prog = program::<SkLookup>(&mut self.bpf, POD_DOOR)?;
            let id = prog
                .attach(&netns_file)
                .map_err(|source| EbpfError::Program {
                    name: POD_DOOR,
                    source,
                })?;
            let link = prog.take_link(id).map_err(|source| EbpfError::Program {
                name: POD_DOOR,
                source,
            })?;
            pin_link(FdLink::from(link), &pin)?;
        }
        self.enrolled
            .insert(netns_cookie, 1, 0)
            .map_err(|source| EbpfError::Map {
                name: "ENROLLED",
                source,
            })
    }

    /// Stops capture for a pod and detaches its door.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), EbpfError> {
        ignore_missing(self.enrolled.remove(&netns_cookie)).map_err(|source| EbpfError::Map {
            name: "ENROLLED",
            source,
        })?;
        let pin = self.links_dir.join(format!("pod-door-{netns_cookie}"));
        if pin.exists() {
            let link = PinnedLink::from_pin(&pin).map_err(|e| pin_error(&pin, e))?;
            // Unpinning and dropping the last reference detaches the program.
            link.unpin().map_err(|e| EbpfError::Pin {
                path: pin.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Forgets pods that are no longer served (their namespace went away while the agent was
    /// down): their doors, enrollment and modes.
    pub fn retain_pods(
        &mut self,
        netns_cookies: &[u64],
        ips: &[Ipv4Addr],
    ) -> Result<(), EbpfError> {
        let stale_cookies: Vec<u64> = self
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|cookie| !netns_cookies.contains(cookie))
            .collect();
        let door_pins = std::fs::read_dir(&self.links_dir)
            .map_err(|source| EbpfError::Io {
                path: self.links_dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                name.strip_prefix("pod-door-")?.parse::<u64>().ok()
            })
            .filter(|cookie| !netns_cookies.contains(cookie));
        let stale: std::collections::BTreeSet<u64> =
            stale_cookies.into_iter().chain(door_pins).collect();
        for cookie in stale {
            self.unenroll(cookie)?;
        }
        let stale_ips: std::collections::BTreeSet<u32> = self
            .inbound_mode
            .keys()
            .filter_map(Result::ok)
            .map(|key| key.ip4)
            .filter(|ip4| !ips.iter().any(|ip| u32::from(*ip).to_be() == *ip4))
            .collect();
        for ip4 in stale_ips {
            self.replace_inbound_modes(Ipv4Addr::from(u32::from_be(ip4)), &[])?;
        }
        Ok(())
    }

    /// Makes the door rules of a pod address exactly `modes` (port 0 is the default).
    /// New entries are written before stale ones are removed, so no SYN ever finds a pod
    /// without its mode.
    pub fn replace_inbound_modes(
        &mut self,
        ip: Ipv4Addr,
        modes: &[DoorRule],
    ) -> Result<(), EbpfError> {
        for rule in modes {
            self.inbound_mode
                .insert(inbound_key(ip, rule.port), rule.value(), 0)
                .map_err(|source| EbpfError::Map {
                    name: "INBOUND_MODE",
                    source,
                })?;
        }
        let stale: Vec<InboundKey> = self
            .inbound_mode
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.ip4 == u32::from(ip).to_be())
            .filter(|key| !modes.iter().any(|rule| rule.port == key.port))
            .collect();
        for key in stale {
            ignore_missing(self.inbound_mode.remove(&key)).map_err(|source| EbpfError::Map {
                name: "INBOUND_MODE",
                source,
            })?;
        }
        Ok(())
    }
}

/// What the pod's door does with a plaintext SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorMode {
    /// Refuse it (STRICT).
    Refuse,
    /// Let it in and record it as plaintext (PERMISSIVE).
    Permit,
    /// Let it in; mutual TLS is off for the port (DISABLE).
    Disabled,
}

impl DoorMode {
    /// What the door does under a resolved policy mode. The one mapping from policy to
    /// kernel: the agent writes it, and `policy apply --dry-run` predicts with it.
    pub fn for_mode(mode: Mode) -> DoorMode {
        match mode {
            Mode::Disable => DoorMode::Disabled,
            Mode::Strict => DoorMode::Refuse,
            Mode::Permissive | Mode::Unset => DoorMode::Permit,
        }
    }

    /// Whether a plaintext SYN is refused.
    pub fn refuses_plaintext(self) -> bool {
        self == DoorMode::Refuse
    }
}

/// One entry of a pod's door: for `port` (0: every port without its own entry), the mode and
/// the number of the policy decision behind it, which the kernel copies into its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoorRule {
    /// The pod's port; 0 is the pod's default.
    pub port: u16,
    /// What the door does.
    pub mode: DoorMode,
    /// The decision number (`interceptor_common::MAX_DECISION` at most; 0 for unknown).
    pub decision: u32,
}

impl DoorRule {
    /// The map value the kernel programs read.
    fn value(self) -> u32 {
        let mode = match self.mode {
            DoorMode::Refuse => interceptor_common::MODE_STRICT,
            DoorMode::Permit => interceptor_common::MODE_PERMISSIVE,
            DoorMode::Disabled => interceptor_common::MODE_DISABLE,
        };
        let decision = if self.decision > interceptor_common::MAX_DECISION {
            0
        } else {
            self.decision
        };
        interceptor_common::inbound_value(mode, decision)
    }
}

/// Tells connect4 which cgroup is the agent's (see `interceptor-ebpf/src/connect4.rs`).
fn set_agent_cgroup(bpf: &mut Ebpf) -> Result<(), EbpfError> {
    let own = crate::cgroup::own_cgroup()?;
    let name = "AGENT_CGROUP";
    let err = |source| EbpfError::Map { name, source };
    // Borrowed, not taken: the programs still to be loaded refer to the map by descriptor.
    let map = bpf.map_mut(name).ok_or_else(|| {
        err(aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        })
    })?;
    let mut slot: Array<&mut MapData, u64> = Array::try_from(map).map_err(err)?;
    slot.set(0, own.id, 0).map_err(err)?;
    tracing::info!(
        cgroup = %own.dir.display(),
        id = own.id,
        "capture leaves the agent's own connects alone"
    );
    Ok(())
}

/// Key of the inbound mode map for an address and port.
fn inbound_key(ip: Ipv4Addr, port: u16) -> InboundKey {
    InboundKey {
        ip4: u32::from(ip).to_be(),
        port,
        _pad: 0,
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), EbpfError> {
    link.pin(path).map(drop).map_err(|e| EbpfError::Pin {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn pin_error(path: &Path, error: LinkError) -> EbpfError {
    EbpfError::Pin {
        path: path.to_owned(),
        message: error.to_string(),
    }
}

fn program<'a, P>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = bpf.program_mut(name).ok_or(EbpfError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    program
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn take_map<M>(bpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf.take_map(name).ok_or(EbpfError::Map {
        name,
        source: aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    M::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Removing an entry that is already gone is not an error here.
fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
