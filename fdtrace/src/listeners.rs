//! The listen queues of the traced processes, sampled once a second from /proc: how many
//! connections the kernel completed that the program has not accepted, against the backlog.
//! A full queue is the "backlog full" cause of a proxy's 504s (the SYNs past it are dropped,
//! the proxy's connect times out), and an app at its descriptor limit fills it.
//!
//! Which sockets a process listens on comes from its /proc/PID/fd (the socket inodes), read
//! again every [`INODES_EVERY`]: listing a large table costs about 1 us per descriptor. The
//! queues and backlogs come from sock_diag (as `ss -lnt` reads them) for processes in
//! fdtrace's network namespace, and from /proc/PID/net/tcp and tcp6 for the others (a
//! container's), which show the queue but not the backlog (0 then). Once per namespace per
//! sample.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::{model::Pid, procfs, sockdiag};

/// How often a process's listening sockets are looked for again.
const INODES_EVERY: Duration = Duration::from_secs(10);
/// Processes sampled at most: a session tracing a whole shell's commands has thousands, and
/// servers are few.
const PROCESSES_MAX: usize = 64;

/// One listening socket of a traced process, as last sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenQueue {
    pub address: String,
    pub queued: u64,
    pub backlog: u64,
    /// When it was first seen full in the current run of full samples (CLOCK_MONOTONIC ns).
    pub full_since: Option<u64>,
}

impl ListenQueue {
    pub fn full(&self) -> bool {
        self.backlog > 0 && self.queued >= self.backlog
    }
}

#[derive(Default)]
pub struct ListenerWatch {
    inodes: BTreeMap<Pid, (Instant, Vec<u64>)>,
    /// The latest sample, by process.
    pub queues: BTreeMap<Pid, Vec<ListenQueue>>,
    /// `ListenOverflows` of each network namespace with a traced listener: (first seen,
    /// latest).
    overflows: BTreeMap<(u64, u64), (u64, u64)>,
    /// The namespace of each process in `queues`.
    netns_of: BTreeMap<Pid, (u64, u64)>,
}

impl ListenerWatch {
    /// Connections its network namespace's listeners dropped, their queue full, since fdtrace
    /// first sampled a traced listener there (a namespace-wide count, as `nstat` shows it, not
    /// one socket's).
    pub fn overflows(&self, pid: Pid) -> u64 {
        self.netns_of
            .get(&pid)
            .and_then(|ns| self.overflows.get(ns))
            .map_or(0, |(first, last)| last.saturating_sub(*first))
    }

    /// Samples the listen queues of `pids` at `now_ns`; forgets processes not among them.
    pub fn sample(&mut self, pids: &[Pid], now_ns: u64) {
        self.inodes.retain(|pid, _| pids.contains(pid));
        self.queues.retain(|pid, _| pids.contains(pid));
        self.netns_of.retain(|pid, _| pids.contains(pid));
        // Tables already read this sample, by network namespace.
        let mut tables: BTreeMap<(u64, u64), Vec<procfs::TcpListener>> = BTreeMap::new();
        // Namespaces whose ListenOverflows this sample read: a server's processes share one.
        let mut counted = std::collections::BTreeSet::new();
        for &pid in pids.iter().take(PROCESSES_MAX) {
            let stale = self
                .inodes
                .get(&pid)
                .is_none_or(|(at, _)| at.elapsed() >= INODES_EVERY);
            if stale {
                self.inodes
                    .insert(pid, (Instant::now(), procfs::socket_inodes(pid)));
            }
            let Some((_, inodes)) = self.inodes.get(&pid).filter(|(_, i)| !i.is_empty()) else {
                continue;
            };
            let Some(netns) = procfs::namespace(&pid.to_string(), "net") else {
                continue;
            };
            let table = tables.entry(netns).or_insert_with(|| {
                tcp_listeners_of(pid, procfs::namespace("self", "net") == Some(netns))
            });
            let previous = self.queues.remove(&pid).unwrap_or_default();
            let now: Vec<ListenQueue> = table
                .iter()
                .filter(|l| inodes.contains(&l.inode))
                .map(|l| {
                    let mut q = ListenQueue {
                        address: l.address.clone(),
                        queued: l.queued,
                        backlog: l.backlog,
                        full_since: None,
                    };
                    if q.full() {
                        q.full_since = previous
                            .iter()
                            .find(|p| p.address == q.address)
                            .and_then(|p| p.full_since)
                            .or(Some(now_ns));
                    }
                    q
                })
                .collect();
            if !now.is_empty() {
                self.queues.insert(pid, now);
                self.netns_of.insert(pid, netns);
                if !counted.insert(netns) {
                    continue;
                }
                if let Some(count) = procfs::listen_overflows(pid) {
                    self.overflows
                        .entry(netns)
                        .and_modify(|(_, last)| *last = count)
                        .or_insert((count, count));
                }
            }
        }
    }
}
/// The TCP listeners of `pid`'s network namespace: from sock_diag, with their backlogs, when
/// it is fdtrace's own (`ours`); else from its /proc/PID/net/tcp and tcp6 (backlog 0).
fn tcp_listeners_of(pid: Pid, ours: bool) -> Vec<procfs::TcpListener> {
    ours.then(|| sockdiag::tcp_listeners().ok())
        .flatten()
        .unwrap_or_else(|| procfs::tcp_listeners(pid))
}

/// How long a peer's queue reading stands for the connects that time out after it: during
/// a burst of timeouts, one netlink dump per ten milliseconds rather than one per failure.
const PEER_FRESH: Duration = Duration::from_millis(10);
/// Peers remembered at most (a proxy may time out against many).
const PEERS_MAX: usize = 1024;

/// Whether the listener an outbound connect was aimed at has its accept queue full: the
/// kernel drops SYNs past a full queue, so a connect that timed out against a full queue on
/// this host was the backlog's doing, not the network's. Read in the connecting process's
/// network namespace (a container's `127.0.0.1` is its own).
#[derive(Default)]
pub struct PeerQueues {
    seen: BTreeMap<(Pid, String), (Instant, bool)>,
}

impl PeerQueues {
    /// `peer` as the tracer formats it (`127.0.0.1:8000`, `[::1]:8000`); false for one
    /// without a listener on this host (a remote peer) or a unix socket.
    pub fn full(&mut self, pid: Pid, peer: &str) -> bool {
        let key = (pid, peer.to_string());
        if let Some((at, full)) = self.seen.get(&key)
            && at.elapsed() < PEER_FRESH
        {
            return *full;
        }
        let full = peer_queue_full(pid, peer);
        if self.seen.len() >= PEERS_MAX {
            self.seen.clear();
        }
        self.seen.insert(key, (Instant::now(), full));
        full
    }
}

fn peer_queue_full(pid: Pid, peer: &str) -> bool {
    let Some((host, port)) = peer.rsplit_once(':') else {
        return false;
    };
    if peer.starts_with("unix:") {
        return false;
    }
    let ours = procfs::namespace("self", "net") == procfs::namespace(&pid.to_string(), "net");
    let listeners = tcp_listeners_of(pid, ours);
    let wildcard = if host.starts_with('[') {
        "[::]"
    } else {
        "0.0.0.0"
    };
    listeners
        .iter()
        .filter(|l| {
            l.address
                .rsplit_once(':')
                .is_some_and(|(h, p)| p == port && (h == host || h == wildcard || h == "[::]"))
        })
        // Without the backlog (/proc's view), a queue not drained is the sign.
        .any(|l| {
            if l.backlog > 0 {
                l.queued >= l.backlog
            } else {
                l.queued > 0
            }
        })
}
