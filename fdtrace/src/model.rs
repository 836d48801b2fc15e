//! The descriptor model: per-process tables, call sites, incidents and limits.
//!
//! Pure state fed by [`Event`]s in time order, from the live probes or a recording alike. No
//! aya, no terminal, no file I/O: correctness lives here and is tested with synthetic events.
//!
//! It is meant to stay attached for days to servers that recycle workers and to scripts that
//! run thousands of commands, so what it keeps of a process goes with it: at exit the table
//! and the call sites are freed, and the record keeps what the report needs (counts, exit
//! code, what was open at exit and the sites that made it; only counts for a clean exit).
//! Past [`MAX_EXITED_KEPT`] exited records, the oldest are folded into [`Folded`] counts.

use std::{
    collections::{BTreeMap, VecDeque},
    num::NonZeroU32,
    sync::Arc,
};

pub use fd_map::FdMap;
pub use folded::{Folded, FoldedGroup, FoldedKey};
pub use sites::{CallSite, Sites};

use arcstr::ArcStr;
use foldhash::HashMap;
use serde::{Deserialize, Serialize};
use sites::GROWTH_WINDOW;

use fdtrace_common::syscalls as sc;

use crate::{container::Container, losses::Losses};

pub type Pid = u32;
/// An interned, unwound stack; [`NO_STACK`] where none was captured.
pub type StackId = u32;
pub const NO_STACK: StackId = 0;
pub type SiteId = usize;
type TableId = u32;

/// What a descriptor refers to (DESIGN.md's list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FdKind {
    File,
    Socket,
    Pipe,
    Eventfd,
    Epoll,
    Timerfd,
    Signalfd,
    Inotify,
    Fanotify,
    Memfd,
    Pidfd,
    #[serde(rename = "io_uring")]
    IoUring,
    Bpf,
    Perf,
    Userfaultfd,
    Other,
}

impl FdKind {
    /// What the syscalls the probe keeps in the kernel create (its `kept::keepable`): their
    /// pairs come counted by syscall, not by descriptor.
    pub fn created_by(nr: u32) -> Self {
        use fdtrace_common::syscalls as sc;
        match nr {
            sc::OPEN | sc::OPENAT | sc::OPENAT2 | sc::CREAT => Self::File,
            sc::SOCKET | sc::ACCEPT | sc::ACCEPT4 => Self::Socket,
            sc::EVENTFD | sc::EVENTFD2 => Self::Eventfd,
            sc::EPOLL_CREATE | sc::EPOLL_CREATE1 => Self::Epoll,
            sc::TIMERFD_CREATE => Self::Timerfd,
            _ => Self::Other,
        }
    }

    pub const ALL: [FdKind; 16] = [
        FdKind::File,
        FdKind::Socket,
        FdKind::Pipe,
        FdKind::Eventfd,
        FdKind::Epoll,
        FdKind::Timerfd,
        FdKind::Signalfd,
        FdKind::Inotify,
        FdKind::Fanotify,
        FdKind::Memfd,
        FdKind::Pidfd,
        FdKind::IoUring,
        FdKind::Bpf,
        FdKind::Perf,
        FdKind::Userfaultfd,
        FdKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FdKind::File => "file",
            FdKind::Socket => "socket",
            FdKind::Pipe => "pipe",
            FdKind::Eventfd => "eventfd",
            FdKind::Epoll => "epoll",
            FdKind::Timerfd => "timerfd",
            FdKind::Signalfd => "signalfd",
            FdKind::Inotify => "inotify",
            FdKind::Fanotify => "fanotify",
            FdKind::Memfd => "memfd",
            FdKind::Pidfd => "pidfd",
            FdKind::IoUring => "io_uring",
            FdKind::Bpf => "bpf",
            FdKind::Perf => "perf",
            FdKind::Userfaultfd => "userfaultfd",
            FdKind::Other => "other",
        }
    }
}

/// RLIMIT_NOFILE; `u64::MAX` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
}

/// A descriptor as it appears: by creation, in /proc at attach, or at reconciliation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewFd {
    pub fd: i32,
    pub kind: FdKind,
    pub target: Arc<str>,
    pub cloexec: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Errno {
    #[serde(rename = "EMFILE")]
    Emfile,
    #[serde(rename = "ENFILE")]
    Enfile,
}

impl Errno {
    pub fn name(self) -> &'static str {
        match self {
            Errno::Emfile => "EMFILE",
            Errno::Enfile => "ENFILE",
        }
    }
}

/// Who a process is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub ppid: Pid,
    /// Its pid in its own (innermost) pid namespace; `None` when /proc could not tell (it
    /// exited first, or a recording predates it), shown as the pid. Also whether `container`
    /// was read: see [`ProcessInfo::placed`].
    pub ns_pid: Option<NonZeroU32>,
    pub comm: String,
    pub exe: String,
    pub limit: Limit,
    /// Its container (DESIGN.md "Additions"), behind a pointer its children share: one word
    /// in each of the [`MAX_EXITED_KEPT`] process records, not a copy of the id.
    pub container: Option<Arc<Container>>,
}

impl ProcessInfo {
    /// Its pid in its own pid namespace, or `pid` when that is unknown.
    pub fn ns_pid_or(&self, pid: Pid) -> Pid {
        self.ns_pid.map_or(pid, NonZeroU32::get)
    }

    /// Whether /proc told where it runs (`ns_pid` and `container`); when not, an exec keeps
    /// what was known.
    pub fn placed(&self) -> bool {
        self.ns_pid.is_some()
    }
}

/// Everything the model consumes. Times are CLOCK_MONOTONIC nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// Tracing began for a process that already had these descriptors.
    Attached {
        pid: Pid,
        ts: u64,
        info: ProcessInfo,
        fds: Vec<NewFd>,
    },
    /// A syscall created descriptors (two for pipes and socketpairs).
    Opened {
        pid: Pid,
        tid: u32,
        ts: u64,
        syscall: u32,
        fds: Vec<NewFd>,
        stack: StackId,
    },
    /// dup, dup2, dup3, F_DUPFD: `to` now refers to what `from` does; an open `to` was closed.
    Duplicated {
        pid: Pid,
        tid: u32,
        ts: u64,
        syscall: u32,
        from: i32,
        to: i32,
        cloexec: bool,
        stack: StackId,
    },
    /// pidfd_getfd: `to` is a copy of descriptor `remote_fd` of the process `pidfd` refers to.
    Fetched {
        pid: Pid,
        tid: u32,
        ts: u64,
        pidfd: i32,
        remote_fd: i32,
        to: i32,
        stack: StackId,
    },
    /// `reopened`: another thread's creation had the number again by the time this close
    /// returned (the probe looked), so a creation of it may come before this in time order.
    Closed {
        pid: Pid,
        ts: u64,
        fd: i32,
        reopened: bool,
    },
    /// close_range; with `cloexec_only` the range is only marked close-on-exec.
    ClosedRange {
        pid: Pid,
        ts: u64,
        first: u32,
        last: u32,
        cloexec_only: bool,
        unshare: bool,
    },
    CloexecSet {
        pid: Pid,
        fd: i32,
        cloexec: bool,
    },
    /// A successful execve: close-on-exec descriptors are gone, the process has a new image.
    Exec {
        pid: Pid,
        ts: u64,
        info: ProcessInfo,
    },
    /// A traced process forked; `shares_table` for CLONE_FILES. The child starts as a copy of
    /// its parent (program, limit, descriptors) but has a pid of its own in its namespace:
    /// `ns_pid` and `container` are the child's as /proc told them. When /proc could not
    /// (`ns_pid` is `None`), its pid there is unknown and it keeps its parent's container.
    Forked {
        parent: Pid,
        child: Pid,
        ts: u64,
        shares_table: bool,
        ns_pid: Option<NonZeroU32>,
        container: Option<Arc<Container>>,
    },
    Exited {
        pid: Pid,
        ts: u64,
        code: Option<i32>,
    },
    /// A syscall failed with EMFILE or ENFILE.
    Failed {
        pid: Pid,
        tid: u32,
        ts: u64,
        syscall: u32,
        errno: Errno,
        stack: StackId,
    },
    LimitChanged {
        pid: Pid,
        limit: Limit,
    },
    /// What /proc/PID/fd listed; differences that persist across two listings are corrected.
    Reconciled {
        pid: Pid,
        ts: u64,
        fds: Vec<NewFd>,
    },
    /// The probes could not deliver this many records.
    Lost {
        count: u64,
    },
    /// Time passes: samples for growth rates are taken on these.
    Tick {
        ts: u64,
    },
    /// What fdtrace could not see so far, by reason (running totals). After the variants
    /// of format 3, so that its recordings decode as they are.
    Losses(Losses),
    /// A TCP connection accepted just after an EMFILE/ENFILE is being closed with nothing
    /// read or written (libuv's reserve-descriptor trick, or any server with that policy);
    /// `request_waiting`: the peer had sent data, so the close resets the connection. Comes
    /// just before that descriptor's `Closed`.
    Unanswered {
        pid: Pid,
        ts: u64,
        fd: i32,
        request_waiting: bool,
    },
    /// The listening socket of the accept that just failed (the `Failed` before this one).
    Listen {
        pid: Pid,
        ts: u64,
        listen: Listen,
    },
    /// An outbound connection of a traced process failed (format 5): a connect that returned
    /// `errno`, or one whose failure getsockopt(SO_ERROR) told (`syscall` says which).
    /// `peer`: `127.0.0.1:8001`, `[::1]:8001`, `unix:/run/app.sock`, or empty when unknown.
    UpstreamFailed {
        pid: Pid,
        ts: u64,
        fd: i32,
        syscall: u32,
        errno: u16,
        peer: Arc<str>,
    },
    /// An outbound TCP connection of a traced process ended without an answer (format 6),
    /// as the state probe saw it end; `duration_ns` from the connect (connect phase) or the
    /// completed handshake (response phase) to that end.
    UpstreamEnded {
        pid: Pid,
        ts: u64,
        fd: i32,
        ended: Ended,
        duration_ns: u64,
        peer: Arc<str>,
    },
    /// The descriptors open as a process's last thread left, from the kernel's own table
    /// (format 6; just before its `Exited`): `open` is the bitmap of descriptors below
    /// `covered`, trailing zero bytes cut. What the events said and the table disagree on
    /// only when events were lost: the table wins, counted in `corrections`.
    ExitTable {
        pid: Pid,
        ts: u64,
        covered: i32,
        open: Vec<u8>,
    },
    /// Descriptors the probe created and closed in the kernel since the last such event for
    /// this call site (format 7): `count` of them, made by `syscall` at `stack`, with their
    /// lifetimes as (microseconds, how many), each the middle of a bucket of the probe's
    /// (within a quarter of the true value). Neither their creation nor their close was sent.
    Balanced {
        pid: Pid,
        ts: u64,
        stack: StackId,
        syscall: u32,
        count: u64,
        lifetimes: Vec<(u64, u32)>,
    },
}

/// How an outbound TCP connection ended without an answer (see the probes' `ENDED_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Ended {
    /// Closed by the process still connecting: nothing answered its SYNs.
    ConnectAbandoned,
    /// The same, while the peer's listener (on this host) had its accept queue full: the
    /// kernel drops the SYNs past it.
    BacklogFull,
    /// A request sent, nothing received, closed by the process: it gave up waiting.
    Unanswered,
    /// The peer closed before sending a byte.
    ClosedEarly,
    /// The peer reset the connection.
    Reset,
}

impl Ended {
    /// The probe's `ENDED_*` value, None for [`sc::ENDED_FAILED`] or an unknown one.
    pub fn from_probe(value: u64) -> Option<Self> {
        match value {
            sc::ENDED_CONNECT_ABANDONED => Some(Self::ConnectAbandoned),
            sc::ENDED_BACKLOG_FULL => Some(Self::BacklogFull),
            sc::ENDED_UNANSWERED => Some(Self::Unanswered),
            sc::ENDED_CLOSED_EARLY => Some(Self::ClosedEarly),
            sc::ENDED_RESET => Some(Self::Reset),
            _ => None,
        }
    }

    pub fn failure(self) -> Failure {
        let (phase, cause) = match self {
            Self::ConnectAbandoned => ("connect", "timeout"),
            Self::BacklogFull => ("connect", "backlog_full"),
            Self::Unanswered => ("response", "timeout"),
            Self::ClosedEarly => ("response", "closed_early"),
            Self::Reset => ("response", "reset"),
        };
        Failure { phase, cause }
    }

    /// The errno nginx logs for it (ETIMEDOUT for the timeouts it makes up itself), 0 for
    /// none.
    pub fn errno(self) -> u16 {
        match self {
            Self::ConnectAbandoned | Self::BacklogFull | Self::Unanswered => sc::ETIMEDOUT as u16,
            Self::Reset => sc::ECONNRESET as u16,
            Self::ClosedEarly => 0,
        }
    }
}

/// What went wrong with an outbound connection, in DESIGN.md's words
/// (`upstream_failures[].phase` and `.cause`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Failure {
    pub phase: &'static str,
    pub cause: &'static str,
}

impl Failure {
    /// A connect or getsockopt that returned `errno`.
    pub fn connect(errno: u16) -> Self {
        Self {
            phase: "connect",
            cause: upstream_cause(errno),
        }
    }

    /// The lowest key, for ranges over one process's groups.
    pub const MIN: Self = Self {
        phase: "",
        cause: "",
    };
}

/// Why an outbound connection failed, in DESIGN.md's words (`upstream_failures[].cause`).
pub fn upstream_cause(errno: u16) -> &'static str {
    match i64::from(errno) {
        sc::ECONNREFUSED => "refused",
        sc::EACCES | sc::EPERM => "permission",
        sc::ENOENT => "no_socket",
        sc::EAGAIN => "backlog_full",
        sc::ETIMEDOUT => "timeout",
        sc::ECONNRESET => "reset",
        sc::ENETUNREACH | sc::EHOSTUNREACH => "unreachable",
        _ => "other",
    }
}

/// The errno's name, as nginx's error log and `upstream_failures[].errno` spell it.
pub fn errno_name(errno: u16) -> String {
    let name = match i64::from(errno) {
        sc::EPERM => "EPERM",
        sc::ENOENT => "ENOENT",
        sc::EAGAIN => "EAGAIN",
        sc::EACCES => "EACCES",
        sc::ENETUNREACH => "ENETUNREACH",
        sc::ECONNRESET => "ECONNRESET",
        sc::ETIMEDOUT => "ETIMEDOUT",
        sc::ECONNREFUSED => "ECONNREFUSED",
        sc::EHOSTUNREACH => "EHOSTUNREACH",
        0 => "",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// What an upstream failure means, for the text report and live lines.
pub fn upstream_meaning(phase: &str, cause: &str, peer: &str) -> &'static str {
    let unix = peer.starts_with("unix:");
    if phase == "response" && cause == "timeout" {
        return "the request was sent and nothing came back before the proxy gave up: the app is slower than the proxy waits, or stuck";
    }
    match cause {
        "refused" if unix => "a socket file is there but nothing accepts on it (the app is down)",
        "refused" => "nothing listens there: the app is down, or this is the wrong port",
        "permission" if unix => {
            "the socket file's owner or mode keeps this process's user out (it needs write permission)"
        }
        "permission" => "refused locally (a firewall rule or a security module)",
        "no_socket" => "no socket at that path: the app is down, or listens elsewhere",
        "backlog_full" if unix => {
            "the socket's listen queue is full: the app does not accept fast enough"
        }
        "backlog_full" => {
            "the app's listen queue was full, so the kernel dropped the SYNs: the app does not accept fast enough (busy workers, or a backlog too small)"
        }
        "timeout" => "no answer to the handshake in time",
        "closed_early" => {
            "the app closed the connection without answering (it crashed, or its worker was killed or restarted)"
        }
        "reset" => "the app reset the connection (it crashed, or closed with the request unread)",
        "unreachable" => "no route to that address",
        _ => "",
    }
}

/// Failed outbound connections of one process to one peer, for one cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamFailures {
    pub errno: u16,
    pub count: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// How long the connections lasted, for those the state probe saw end.
    pub durations: Option<Durations>,
}

/// The shortest, longest and total of a group's durations (ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Durations {
    pub min_ns: u64,
    pub max_ns: u64,
    pub total_ns: u64,
    pub count: u64,
}

impl Durations {
    fn add(this: Option<Self>, ns: u64) -> Self {
        this.map_or(
            Self {
                min_ns: ns,
                max_ns: ns,
                total_ns: ns,
                count: 1,
            },
            |d| Self {
                min_ns: d.min_ns.min(ns),
                max_ns: d.max_ns.max(ns),
                total_ns: d.total_ns.saturating_add(ns),
                count: d.count + 1,
            },
        )
    }
}

/// Groups kept in [`Model::upstream`]; failures past them are only counted in
/// [`Model::upstream_not_grouped`] (a proxy trying thousands of distinct peers).
pub const MAX_UPSTREAM_GROUPS: usize = 10_000;

/// A listening socket's queue at the instant an accept on it failed at the limit: `queued`
/// connections the kernel completed and the program could not take, of `backlog`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listen {
    pub fd: i32,
    /// `127.0.0.1:8000`, `[::1]:8000`; empty when unknown.
    pub address: String,
    pub queued: u32,
    pub backlog: u32,
}

/// An upstream failure as one event says it: who, to which peer, what, its errno, and how
/// long the connection lasted when known.
pub struct UpstreamEvent<'a> {
    pub pid: Pid,
    pub peer: &'a Arc<str>,
    pub failure: Failure,
    pub errno: u16,
    pub duration_ns: Option<u64>,
}

impl Event {
    /// The upstream failure this event reports, if it is one.
    pub fn upstream(&self) -> Option<UpstreamEvent<'_>> {
        match self {
            Event::UpstreamFailed {
                pid, errno, peer, ..
            } => Some(UpstreamEvent {
                pid: *pid,
                peer,
                failure: Failure::connect(*errno),
                errno: *errno,
                duration_ns: None,
            }),
            Event::UpstreamEnded {
                pid,
                ended,
                duration_ns,
                peer,
                ..
            } => Some(UpstreamEvent {
                pid: *pid,
                peer,
                failure: ended.failure(),
                errno: ended.errno(),
                duration_ns: Some(*duration_ns),
            }),
            _ => None,
        }
    }

    /// When it happened (CLOCK_MONOTONIC ns), for events that carry a time.
    pub fn ts(&self) -> Option<u64> {
        match self {
            Event::Attached { ts, .. }
            | Event::Opened { ts, .. }
            | Event::Duplicated { ts, .. }
            | Event::Fetched { ts, .. }
            | Event::Closed { ts, .. }
            | Event::ClosedRange { ts, .. }
            | Event::Exec { ts, .. }
            | Event::Forked { ts, .. }
            | Event::Exited { ts, .. }
            | Event::Failed { ts, .. }
            | Event::Reconciled { ts, .. }
            | Event::Unanswered { ts, .. }
            | Event::Listen { ts, .. }
            | Event::UpstreamFailed { ts, .. }
            | Event::UpstreamEnded { ts, .. }
            | Event::ExitTable { ts, .. }
            | Event::Balanced { ts, .. }
            | Event::Tick { ts } => Some(*ts),
            Event::CloexecSet { .. }
            | Event::LimitChanged { .. }
            | Event::Lost { .. }
            | Event::Losses(_) => None,
        }
    }

    /// The time field itself (recordings store times as deltas).
    pub fn ts_mut(&mut self) -> Option<&mut u64> {
        match self {
            Event::Attached { ts, .. }
            | Event::Opened { ts, .. }
            | Event::Duplicated { ts, .. }
            | Event::Fetched { ts, .. }
            | Event::Closed { ts, .. }
            | Event::ClosedRange { ts, .. }
            | Event::Exec { ts, .. }
            | Event::Forked { ts, .. }
            | Event::Exited { ts, .. }
            | Event::Failed { ts, .. }
            | Event::Reconciled { ts, .. }
            | Event::Unanswered { ts, .. }
            | Event::Listen { ts, .. }
            | Event::UpstreamFailed { ts, .. }
            | Event::UpstreamEnded { ts, .. }
            | Event::ExitTable { ts, .. }
            | Event::Balanced { ts, .. }
            | Event::Tick { ts } => Some(ts),
            Event::CloexecSet { .. }
            | Event::LimitChanged { .. }
            | Event::Lost { .. }
            | Event::Losses(_) => None,
        }
    }
}

/// Connections one process accepted just after an EMFILE/ENFILE and closed with nothing read
/// or written: a proxy in front of it sees each as "upstream prematurely closed connection"
/// or, when its request had arrived (`request_waiting`), "connection reset by peer" (a 502).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unanswered {
    pub count: u64,
    pub request_waiting: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Where the latest of them was accepted.
    pub stack: StackId,
}

/// One open descriptor: 24 bytes, since a million of them are held in [`FdMap`]s. The target
/// is a thin pointer, most often to the copy its site keeps (see [`CallSite::note_target`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenFd {
    pub kind: FdKind,
    pub cloexec: bool,
    /// A [`SiteId`], narrowed: four billion sites would not fit in memory anyway.
    site: u32,
    pub opened_ns: u64,
    pub target: ArcStr,
}

const _: () = assert!(size_of::<Option<OpenFd>>() == 24);

impl OpenFd {
    pub fn site(&self) -> SiteId {
        self.site as SiteId
    }
}

/// Where a call site's descriptors came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Created while traced, with a stack.
    Traced,
    /// Open before tracing began.
    Inherited,
    /// Found in /proc but never seen created (SCM_RIGHTS, io_uring, lost events).
    Reconciled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SiteKey {
    pid: Pid,
    stack: StackId,
    kind: FdKind,
    origin: Origin,
}

/// An EMFILE/ENFILE failure and who held the table at that instant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub ts: u64,
    pub pid: Pid,
    pub tid: u32,
    pub syscall: u32,
    pub errno: Errno,
    pub open_fds: u64,
    pub limit: u64,
    pub stack: StackId,
    /// (site, descriptors it held), most first. These sites are kept for as long as the model.
    pub blame: Vec<(SiteId, u64)>,
    /// For an accept: its listening socket's queue at that instant.
    pub listen: Option<Listen>,
}

/// A traced process.
#[derive(Clone, Debug)]
pub struct Process {
    pub pid: Pid,
    pub info: ProcessInfo,
    table: TableId,
    pub peak_open: u64,
    pub started_ns: u64,
    /// Set when the process exits, with what it held at that moment.
    pub exit: Option<ProcessExit>,
    /// What only a live process needs: most processes of a long session have exited, and
    /// each of those costs its record only.
    live: Option<Box<LiveProcess>>,
}

#[derive(Clone, Debug, Default)]
struct LiveProcess {
    samples: VecDeque<(u64, u64)>,
    /// Its call sites. An exited process's are those its snapshot refers to.
    sites: Vec<SiteId>,
}

// `ProcessInfo::container` made it 8 bytes more (`ns_pid` fits in what was padding).
const _: () = assert!(size_of::<Process>() <= 168);

#[derive(Clone, Debug)]
pub struct ProcessExit {
    pub ts: u64,
    pub code: Option<i32>,
    /// Descriptors open at exit.
    pub open: u64,
    /// Those descriptors, ascending, unless the process exited clean (see
    /// [`ProcessExit::clean`]): then only their number is kept.
    pub open_at_exit: Box<[(i32, OpenFd)]>,
    clean: bool,
    /// Exit order, to fold the oldest first.
    seq: u64,
    /// What keeping this record costs, roughly: see [`ProcessExit::bytes`].
    bytes: u32,
}

impl ProcessExit {
    /// Nothing was open at exit but stdio (numbers 0 to 2, whoever opened them: a shell sets
    /// up its children's pipes and redirections there). Such processes are counted, not
    /// listed, and keep no descriptors or call sites: they are most processes of a shell
    /// script or a `make -j`, and what they held is not a leak.
    pub fn clean(&self) -> bool {
        self.clean
    }

    /// About what an exited record holds: the process (twice, for the map's half-full nodes),
    /// its names, and each descriptor open at exit with a site of its own (half as much again,
    /// for the slab's spare room). Within 10% of what tests/churn.rs measures.
    fn bytes(info: &ProcessInfo, open_at_exit: usize) -> u32 {
        let bytes = 2 * size_of::<Process>()
            + info.comm.len()
            + info.exe.len()
            + open_at_exit * (size_of::<(i32, OpenFd)>() + size_of::<CallSite>() * 3 / 2);
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

impl Process {
    pub fn alive(&self) -> bool {
        self.exit.is_none()
    }

    pub fn growth_per_min(&self) -> f64 {
        let samples = self.live.as_ref().map(|l| &l.samples);
        growth_per_min(samples.into_iter().flatten().copied())
    }
}

#[derive(Clone, Debug, Default)]
struct FdTable {
    fds: FdMap,
    /// Processes using this table (more than one with CLONE_FILES).
    users: u32,
}

/// A process's descriptors: its live table, or what it had open at exit.
#[derive(Clone, Copy, Debug)]
pub enum FdView<'a> {
    Live(&'a FdMap),
    Exited(&'a [(i32, OpenFd)]),
}

impl<'a> FdView<'a> {
    pub fn len(self) -> usize {
        match self {
            FdView::Live(map) => map.len(),
            FdView::Exited(fds) => fds.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    pub fn get(self, fd: i32) -> Option<&'a OpenFd> {
        match self {
            FdView::Live(map) => map.get(fd),
            FdView::Exited(fds) => fds
                .binary_search_by_key(&fd, |(n, _)| *n)
                .ok()
                .map(|i| &fds[i].1),
        }
    }

    /// Descriptors in ascending order.
    pub fn iter(self) -> impl Iterator<Item = (i32, &'a OpenFd)> {
        let (live, exited) = match self {
            FdView::Live(map) => (Some(map.iter()), None),
            FdView::Exited(fds) => (None, Some(fds.iter().map(|(n, f)| (*n, f)))),
        };
        live.into_iter()
            .flatten()
            .chain(exited.into_iter().flatten())
    }

    pub fn keys(self) -> impl Iterator<Item = i32> + 'a {
        self.iter().map(|(n, _)| n)
    }

    pub fn values(self) -> impl Iterator<Item = &'a OpenFd> {
        self.iter().map(|(_, f)| f)
    }
}

/// Discrepancies seen by the last reconciliation, corrected if the next one sees them again.
#[derive(Clone, Debug, Default)]
struct Suspects {
    missing: Vec<(i32, FdKind)>,
    unknown: Vec<(i32, FdKind)>,
}

/// Counts of corrections made to keep the tables true.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Corrections {
    /// Descriptors /proc listed that no event created.
    pub added: u64,
    /// Descriptors the table held that /proc no longer listed.
    pub removed: u64,
    /// Creations that returned a number the table thought was still open.
    pub reused: u64,
}

/// Incidents kept with their full blame; later ones are only counted. A server that keeps
/// retrying accept() fails thousands of times a minute, and each one repeats the same blame.
pub const MAX_INCIDENTS: usize = 1_000;

/// Exited processes kept one by one (for the report's per-process entries and what they had
/// open at exit); older ones are folded into [`Model::folded`]. A clean one costs about 350
/// bytes, one with descriptors open at exit about 900 with four: this is a few MB.
pub const MAX_EXITED_KEPT: usize = 10_000;
/// And at most this much memory, by [`ProcessExit::bytes`]: a server that recycles a leaking
/// worker every 100 ms fills it in ten minutes, and is flat from then on.
pub const MAX_EXITED_BYTES: usize = 4 << 20;

/// How long a displaced number waits for the racing close that explains it, and such a close
/// for its creation. The two return microseconds apart, so a second is generous.
const RACE_WAIT_NS: u64 = 1_000_000_000;

/// Events at a process's descriptor numbers waiting up to [`RACE_WAIT_NS`] for the racing
/// event that explains them (see [`Model::displaced`]), oldest first at each number.
#[derive(Debug, Default)]
struct Waiting(HashMap<(Pid, i32), Vec<u64>>);

impl Waiting {
    fn add(&mut self, key: (Pid, i32), ts: u64) {
        self.0.entry(key).or_default().push(ts);
    }

    /// Takes the oldest event waiting at `key`; false when none was.
    fn take(&mut self, key: (Pid, i32)) -> bool {
        let Some(times) = self.0.get_mut(&key) else {
            return false;
        };
        times.remove(0);
        if times.is_empty() {
            self.0.remove(&key);
        }
        true
    }

    /// Forgets the events that waited in vain by `now`; returns how many.
    fn expire(&mut self, now: u64) -> u64 {
        let mut expired = 0;
        self.0.retain(|_, times| {
            let before = times.len();
            times.retain(|at| now.saturating_sub(*at) < RACE_WAIT_NS);
            expired += (before - times.len()) as u64;
            !times.is_empty()
        });
        expired
    }
}

#[derive(Debug, Default)]
pub struct Model {
    /// Live processes, and the last exited process of each pid until it is folded (see
    /// [`MAX_EXITED_KEPT`]) or the pid comes back.
    pub processes: BTreeMap<Pid, Process>,
    tables: HashMap<TableId, FdTable>,
    next_table: TableId,
    pub sites: Sites,
    /// Sites of live processes, by what they are. A process's entries go at its exit, so a
    /// reused pid starts with sites of its own.
    site_index: HashMap<SiteKey, SiteId>,
    /// Times of the recent ticks, at which sites were sampled.
    ticks: VecDeque<u64>,
    /// Descriptors created and closed so far (fork copies included, as in each site's counts).
    pub opened_total: u64,
    pub closed_total: u64,
    /// Exited processes in `processes`, what they cost, and the order they exited in.
    exited_kept: usize,
    exited_bytes: usize,
    exit_order: VecDeque<(Pid, u64)>,
    exits: u64,
    /// Exited processes no longer kept one by one.
    pub folded: Folded,
    pub incidents: Vec<Incident>,
    pub incidents_total: u64,
    pub dropped: u64,
    /// Connections accepted at the limit and closed unanswered, by process (pid and start,
    /// so that a reused pid counts afresh). Rare, so kept apart from [`Process`].
    pub unanswered: BTreeMap<(Pid, u64), Unanswered>,
    /// Failed outbound connections by (process, its start, peer, cause): what a proxy in front
    /// of a dead or misconfigured app sees. Kept after the process exits.
    pub upstream: BTreeMap<(Pid, u64, Arc<str>, Failure), UpstreamFailures>,
    pub upstream_not_grouped: u64,
    /// The latest totals of what was missed, by reason (`dropped` counts events alone, and
    /// is all that recordings before format 4 say).
    pub losses: Losses,
    pub corrections: Corrections,
    suspects: HashMap<Pid, Suspects>,
    /// Numbers a creation got while the table held them open, by when. A close frees its
    /// number inside the syscall, so another thread's creation can take the number and return
    /// first: such a close says so (`reopened`) and explains the displacement, before or
    /// after it in time order. One no close explains within [`RACE_WAIT_NS`] was a missed
    /// close, counted as a correction. Several can wait at one number: two closes of it can
    /// be in flight at once (A's close, B's creation and close, C's creation, then both
    /// closes return).
    displaced: Waiting,
    /// Closes that found their number taken again before the creation that took it reached
    /// the model: that creation will displace the old descriptor, and this explains it.
    reopened_closes: Waiting,
    pub first_ns: u64,
    pub last_ns: u64,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&mut self, event: &Event) {
        if let Some(ts) = event.ts() {
            if self.first_ns == 0 {
                self.first_ns = ts;
            }
            self.last_ns = self.last_ns.max(ts);
        }
        match event {
            Event::Attached { pid, ts, info, fds } => self.attach(*pid, *ts, info, fds),
            Event::Opened {
                pid,
                ts,
                fds,
                stack,
                ..
            } => {
                for new in fds {
                    self.open(*pid, *ts, new, *stack, Origin::Traced);
                }
            }
            Event::Duplicated {
                pid,
                ts,
                from,
                to,
                cloexec,
                stack,
                ..
            } => {
                self.duplicate(*pid, *ts, *from, *to, *cloexec, *stack);
            }
            Event::Fetched {
                pid,
                ts,
                pidfd,
                remote_fd,
                to,
                stack,
                ..
            } => {
                self.fetch(*pid, *ts, *pidfd, *remote_fd, *to, *stack);
            }
            Event::Closed {
                pid,
                ts,
                fd,
                reopened,
            } => {
                self.traced_close(*pid, *ts, *fd, *reopened);
            }
            Event::ClosedRange {
                pid,
                ts,
                first,
                last,
                cloexec_only,
                unshare,
            } => {
                self.close_range(*pid, *ts, *first, *last, *cloexec_only, *unshare);
            }
            Event::CloexecSet { pid, fd, cloexec } => {
                if let Some(open) = self.table_mut(*pid).and_then(|t| t.fds.get_mut(*fd)) {
                    open.cloexec = *cloexec;
                }
            }
            Event::Exec { pid, ts, info } => self.exec(*pid, *ts, info),
            Event::Forked {
                parent,
                child,
                ts,
                shares_table,
                ns_pid,
                container,
            } => {
                self.fork(*parent, *child, *ts, *shares_table);
                self.place(*child, *ns_pid, container.as_ref());
            }
            Event::Exited { pid, ts, code } => self.exit(*pid, *ts, *code),
            Event::ExitTable {
                pid,
                ts,
                covered,
                open,
            } => self.exit_table(*pid, *ts, *covered, open),
            Event::Failed {
                pid,
                tid,
                ts,
                syscall,
                errno,
                stack,
            } => {
                self.fail(*pid, *tid, *ts, *syscall, *errno, *stack);
            }
            Event::LimitChanged { pid, limit } => {
                if let Some(p) = self.processes.get_mut(pid) {
                    p.info.limit = *limit;
                }
            }
            Event::Reconciled { pid, ts, fds } => self.reconcile(*pid, *ts, fds),
            Event::Lost { count } => self.dropped += count,
            Event::Losses(totals) => self.losses = self.losses.max(*totals),
            Event::Tick { ts } => self.tick(*ts),
            Event::Balanced {
                pid,
                ts,
                stack,
                syscall,
                count,
                lifetimes,
            } => self.balanced(*pid, *ts, (*stack, *syscall), *count, lifetimes),
            Event::Unanswered {
                pid,
                ts,
                fd,
                request_waiting,
            } => self.unanswered(*pid, *ts, *fd, *request_waiting),
            Event::Listen { pid, ts, listen } => {
                if let Some(inc) = self
                    .incidents
                    .last_mut()
                    .filter(|i| i.pid == *pid && i.ts == *ts)
                {
                    inc.listen = Some(listen.clone());
                }
            }
            Event::UpstreamFailed {
                pid,
                ts,
                errno,
                peer,
                ..
            } => self.upstream_failed(*pid, *ts, Failure::connect(*errno), *errno, None, peer),
            Event::UpstreamEnded {
                pid,
                ts,
                ended,
                duration_ns,
                peer,
                ..
            } => self.upstream_failed(
                *pid,
                *ts,
                ended.failure(),
                ended.errno(),
                Some(*duration_ns),
                peer,
            ),
        }
    }

    /// The upstream failure groups, most failures first: (pid, its command, peer, cause, counts).
    pub fn upstream_groups(&self) -> Vec<(Pid, &str, &str, Failure, &UpstreamFailures)> {
        let mut groups: Vec<_> = self
            .upstream
            .iter()
            .map(|((pid, _, peer, failure), g)| {
                let comm = self.processes.get(pid).map_or("", |p| p.info.comm.as_str());
                (*pid, comm, &**peer, *failure, g)
            })
            .collect();
        groups.sort_by(|a, b| b.4.count.cmp(&a.4.count).then(a.0.cmp(&b.0)));
        groups
    }

    fn upstream_failed(
        &mut self,
        pid: Pid,
        ts: u64,
        failure: Failure,
        errno: u16,
        duration_ns: Option<u64>,
        peer: &Arc<str>,
    ) {
        let started = self.processes.get(&pid).map_or(0, |p| p.started_ns);
        let key = (pid, started, peer.clone(), failure);
        if !self.upstream.contains_key(&key) && self.upstream.len() >= MAX_UPSTREAM_GROUPS {
            self.upstream_not_grouped += 1;
            return;
        }
        let group = self.upstream.entry(key).or_insert(UpstreamFailures {
            errno,
            count: 0,
            first_ns: ts,
            last_ns: ts,
            durations: None,
        });
        if let Some(ns) = duration_ns {
            group.durations = Some(Durations::add(group.durations, ns));
        }
        group.count += 1;
        group.first_ns = group.first_ns.min(ts);
        group.last_ns = group.last_ns.max(ts);
    }

    fn attach(&mut self, pid: Pid, ts: u64, info: &ProcessInfo, fds: &[NewFd]) {
        if self.processes.get(&pid).is_some_and(Process::alive) {
            return;
        }
        self.fold_exited(pid);
        let table = self.new_table();
        self.processes
            .insert(pid, Process::new(pid, info.clone(), table, ts));
        for new in fds {
            self.open(pid, ts, new, NO_STACK, Origin::Inherited);
        }
    }

    fn new_table(&mut self) -> TableId {
        self.next_table += 1;
        self.tables.insert(
            self.next_table,
            FdTable {
                fds: FdMap::default(),
                users: 1,
            },
        );
        self.next_table
    }

    /// Makes sure a process exists: events can name a process seen for the first time (a
    /// fork record lost to a full ring).
    fn ensure(&mut self, pid: Pid, ts: u64) {
        if !self.processes.contains_key(&pid) {
            let table = self.new_table();
            self.processes
                .insert(pid, Process::new(pid, ProcessInfo::default(), table, ts));
        }
    }

    fn table_mut(&mut self, pid: Pid) -> Option<&mut FdTable> {
        let id = self.processes.get(&pid).filter(|p| p.alive())?.table;
        self.tables.get_mut(&id)
    }

    /// The descriptors `pid` has open now, or had at exit (none are kept for a clean exit).
    pub fn open_fds(&self, pid: Pid) -> Option<FdView<'_>> {
        let p = self.processes.get(&pid)?;
        match &p.exit {
            Some(exit) => Some(FdView::Exited(&exit.open_at_exit)),
            None => self.tables.get(&p.table).map(|t| FdView::Live(&t.fds)),
        }
    }

    pub fn open_count(&self, pid: Pid) -> u64 {
        match self.processes.get(&pid).and_then(|p| p.exit.as_ref()) {
            Some(exit) => exit.open,
            None => self.open_fds(pid).map_or(0, |t| t.len() as u64),
        }
    }

    /// Exited processes, kept one by one or folded.
    pub fn exited_count(&self) -> u64 {
        self.exited_kept as u64 + self.folded.processes
    }

    fn unanswered(&mut self, pid: Pid, ts: u64, fd: i32, request_waiting: bool) {
        let Some(p) = self.processes.get(&pid) else {
            return;
        };
        // The accept's stack names the policy (libuv's `uv__emfile_trick`, say).
        let stack = self
            .open_fds(pid)
            .and_then(|t| t.get(fd))
            .and_then(|f| self.sites.get(f.site()))
            .map(|site| site.stack);
        let d = self.unanswered.entry((pid, p.started_ns)).or_default();
        d.count += 1;
        d.request_waiting += u64::from(request_waiting);
        if d.first_ns == 0 {
            d.first_ns = ts;
        }
        d.last_ns = ts;
        if let Some(stack) = stack {
            d.stack = stack;
        }
    }

    /// Connections `p` accepted at the limit and closed unanswered.
    pub fn unanswered_of(&self, p: &Process) -> Unanswered {
        self.unanswered
            .get(&(p.pid, p.started_ns))
            .copied()
            .unwrap_or_default()
    }

    fn site(&mut self, key: SiteKey) -> SiteId {
        if let Some(&id) = self.site_index.get(&key) {
            return id;
        }
        let id = self
            .sites
            .insert(CallSite::new(key.pid, key.stack, key.kind, key.origin));
        self.site_index.insert(key, id);
        if let Some(live) = self
            .processes
            .get_mut(&key.pid)
            .and_then(|p| p.live.as_mut())
        {
            live.sites.push(id);
        }
        id
    }

    fn open(&mut self, pid: Pid, ts: u64, new: &NewFd, stack: StackId, origin: Origin) {
        self.ensure(pid, ts);
        let key = SiteKey {
            pid,
            stack,
            kind: new.kind,
            origin,
        };
        let replaced = self.adopt(pid, ts, new.fd, key, &new.target, new.cloexec, ts);
        if replaced.is_some() && origin == Origin::Traced {
            // The kernel handed out a number we believed open: its close raced with this
            // creation (see `displaced`), or was never seen.
            let key = (pid, new.fd);
            if !self.reopened_closes.take(key) {
                self.displaced.add(key, ts);
            }
        }
    }

    /// Descriptors created and closed in the kernel: counted at their call site as opened,
    /// closed and their lifetimes, as if each had been seen.
    fn balanced(
        &mut self,
        pid: Pid,
        ts: u64,
        (stack, syscall): (StackId, u32),
        count: u64,
        lifetimes: &[(u64, u32)],
    ) {
        self.ensure(pid, ts);
        if self.table_mut(pid).is_none() {
            return;
        }
        let site = self.site(SiteKey {
            pid,
            stack,
            kind: FdKind::created_by(syscall),
            origin: Origin::Traced,
        });
        let Some(s) = self.sites.get_mut(site) else {
            return;
        };
        s.opened += count;
        s.closed += count;
        for &(micros, n) in lifetimes {
            s.record_pairs(n, micros);
        }
        self.opened_total += count;
        self.closed_total += count;
    }

    /// A close the probes saw; see [`Model::displaced`].
    fn traced_close(&mut self, pid: Pid, ts: u64, fd: i32, reopened: bool) {
        let key = (pid, fd);
        if reopened {
            // Whatever the table holds at this number is the creation's that took it (which
            // displaced this close's descriptor already) or this close's own (which that
            // creation will displace): either way it is not to be removed here.
            if !self.displaced.take(key) {
                self.reopened_closes.add(key, ts);
            }
            return;
        }
        if !self.close(pid, ts, fd) {
            // Nothing to close: this close's descriptor was displaced by a creation (whose own
            // descriptor was closed in between), and this explains it.
            self.displaced.take(key);
        }
    }

    /// Puts a descriptor into `pid`'s table under the site `key`, counting it there; returns
    /// what held the number before (now closed). Nothing happens for a process that is not
    /// alive: its sites would count a descriptor no table holds.
    #[expect(clippy::too_many_arguments, reason = "one descriptor's facts")]
    fn adopt(
        &mut self,
        pid: Pid,
        ts: u64,
        num: i32,
        key: SiteKey,
        target: &str,
        cloexec: bool,
        opened_ns: u64,
    ) -> Option<OpenFd> {
        if num < 0 || self.table_mut(pid).is_none() {
            return None;
        }
        let site = self.site(key);
        let s = self.sites.get_mut(site)?;
        s.open += 1;
        s.opened += 1;
        self.opened_total += 1;
        let target = s.note_target(target);
        self.insert(
            pid,
            ts,
            num,
            OpenFd {
                kind: key.kind,
                target,
                site: u32::try_from(site).expect("fewer than 2^32 call sites"),
                opened_ns,
                cloexec,
            },
        )
    }

    /// Puts `fd` into `pid`'s table, closing what held the number before; returns that.
    fn insert(&mut self, pid: Pid, ts: u64, num: i32, fd: OpenFd) -> Option<OpenFd> {
        let table = self.table_mut(pid)?;
        let old = table.fds.insert(num, fd);
        let open = table.fds.len() as u64;
        if let Some(old) = &old {
            self.retire(old, ts);
        }
        if let Some(p) = self.processes.get_mut(&pid) {
            p.peak_open = p.peak_open.max(open);
        }
        old
    }

    /// Accounts for a descriptor that is gone.
    fn retire(&mut self, fd: &OpenFd, ts: u64) {
        self.closed_total += 1;
        let Some(s) = self.sites.get_mut(fd.site()) else {
            return;
        };
        s.open = s.open.saturating_sub(1);
        s.closed += 1;
        let micros = ts.saturating_sub(fd.opened_ns) / 1000;
        s.record_lifetime(micros);
        // The last descriptor of an exited process's site, in a table another process shares.
        self.sites.free_if_unreferenced(fd.site());
    }

    fn duplicate(&mut self, pid: Pid, ts: u64, from: i32, to: i32, cloexec: bool, stack: StackId) {
        if from == to {
            return; // dup2(fd, fd) changes nothing
        }
        self.ensure(pid, ts);
        let source = self
            .table_mut(pid)
            .and_then(|t| t.fds.get(from))
            .map(|f| (f.kind, f.target.clone()));
        let (kind, target) =
            source.unwrap_or_else(|| (FdKind::Other, ArcStr::from(format!("dup of fd {from}"))));
        self.adopt(
            pid,
            ts,
            to,
            SiteKey {
                pid,
                stack,
                kind,
                origin: Origin::Traced,
            },
            &target,
            cloexec,
            ts,
        );
    }

    /// A copy of a descriptor of the process a pidfd refers to (pidfd_getfd): what it is comes
    /// from that process's table when it is traced. Always close-on-exec.
    fn fetch(&mut self, pid: Pid, ts: u64, pidfd: i32, remote_fd: i32, to: i32, stack: StackId) {
        self.ensure(pid, ts);
        let source = self
            .table_mut(pid)
            .and_then(|t| t.fds.get(pidfd))
            .and_then(|f| f.target.strip_prefix("pid ")?.parse::<Pid>().ok())
            .and_then(|remote| self.open_fds(remote)?.get(remote_fd))
            .map(|f| (f.kind, f.target.clone()));
        let (kind, target) = source.unwrap_or_else(|| {
            (
                FdKind::Other,
                ArcStr::from(format!("fd {remote_fd} of a pidfd's process")),
            )
        });
        self.adopt(
            pid,
            ts,
            to,
            SiteKey {
                pid,
                stack,
                kind,
                origin: Origin::Traced,
            },
            &target,
            true,
            ts,
        );
    }

    fn close(&mut self, pid: Pid, ts: u64, fd: i32) -> bool {
        let Some(old) = self.table_mut(pid).and_then(|t| t.fds.remove(fd)) else {
            return false;
        };
        self.retire(&old, ts);
        true
    }

    fn close_range(
        &mut self,
        pid: Pid,
        ts: u64,
        first: u32,
        last: u32,
        cloexec_only: bool,
        unshare: bool,
    ) {
        if unshare {
            self.unshare(pid);
        }
        let Some(table) = self.table_mut(pid) else {
            return;
        };
        let first = i32::try_from(first).unwrap_or(i32::MAX);
        let last = i32::try_from(last).unwrap_or(i32::MAX);
        if first > last {
            return;
        }
        if cloexec_only {
            for fd in table.fds.range_mut(first, last) {
                fd.cloexec = true;
            }
            return;
        }
        let doomed: Vec<i32> = table.fds.range(first, last).map(|(n, _)| n).collect();
        for n in doomed {
            self.close(pid, ts, n);
        }
    }

    /// Gives `pid` its own copy of a shared table (exec and CLOSE_RANGE_UNSHARE do this).
    fn unshare(&mut self, pid: Pid) {
        let Some(p) = self.processes.get(&pid).filter(|p| p.alive()) else {
            return;
        };
        let old = p.table;
        let Some(table) = self.tables.get_mut(&old) else {
            return;
        };
        if table.users <= 1 {
            return;
        }
        table.users -= 1;
        let fds = table.fds.clone();
        // Each copy is a descriptor more of its site: a site is freed when none is left.
        for fd in fds.values() {
            if let Some(s) = self.sites.get_mut(fd.site()) {
                s.open += 1;
            }
        }
        self.next_table += 1;
        let id = self.next_table;
        self.tables.insert(id, FdTable { fds, users: 1 });
        if let Some(p) = self.processes.get_mut(&pid) {
            p.table = id;
        }
    }

    fn exec(&mut self, pid: Pid, ts: u64, info: &ProcessInfo) {
        self.ensure(pid, ts);
        self.unshare(pid);
        if let Some(p) = self.processes.get_mut(&pid) {
            // The limit and the parent survive exec; unknown fields keep their old values.
            let keep = |new: &str, old: &str| {
                if new.is_empty() {
                    old.to_string()
                } else {
                    new.to_string()
                }
            };
            p.info.comm = keep(&info.comm, &p.info.comm);
            p.info.exe = keep(&info.exe, &p.info.exe);
        }
        // Exec changes neither the pid namespace nor the cgroup: what was known stays when
        // /proc could not be read in time.
        if info.placed() {
            self.place(pid, info.ns_pid, info.container.as_ref());
        }
        let doomed: Vec<i32> = self
            .table_mut(pid)
            .map(|t| {
                t.fds
                    .iter()
                    .filter(|(_, f)| f.cloexec)
                    .map(|(n, _)| n)
                    .collect()
            })
            .unwrap_or_default();
        for n in doomed {
            self.close(pid, ts, n);
        }
    }

    fn fork(&mut self, parent: Pid, child: Pid, ts: u64, shares_table: bool) {
        self.ensure(parent, ts);
        let parent_table = self.processes[&parent].table;
        // A child starts as its parent's copy: same program, same limit.
        let info = ProcessInfo {
            ppid: parent,
            ..self.processes[&parent].info.clone()
        };

        // A pid can be reused: the old process gives way, folded into the counts. One we
        // thought alive missed its exit.
        if self.processes.get(&child).is_some_and(Process::alive) {
            self.exit(child, ts, None);
        }
        self.fold_exited(child);
        if shares_table {
            if let Some(t) = self.tables.get_mut(&parent_table) {
                t.users += 1;
            }
            self.processes
                .insert(child, Process::new(child, info, parent_table, ts));
            return;
        }
        let table = self.new_table();
        self.processes
            .insert(child, Process::new(child, info, table, ts));
        let inherited: Vec<(i32, OpenFd)> = self
            .tables
            .get(&parent_table)
            .map(|t| t.fds.iter().map(|(n, f)| (n, f.clone())).collect())
            .unwrap_or_default();
        // The child's descriptors keep the parent's call site (same stack, origin and kind),
        // counted under the child so each process's holdings add up. Such a site is small
        // (no lifetimes or samples until it needs them) and goes with the child.
        for (n, fd) in inherited {
            let Some(parent_site) = self.sites.get(fd.site()) else {
                continue;
            };
            let key = SiteKey {
                pid: child,
                stack: parent_site.stack,
                kind: fd.kind,
                origin: parent_site.origin,
            };
            self.adopt(child, ts, n, key, &fd.target, fd.cloexec, fd.opened_ns);
        }
    }

    /// Sets where a process runs as /proc told. Without `ns_pid` (/proc could not be read) it
    /// keeps the container it had: a child's is its parent's, the cgroup being inherited at
    /// fork. An equal container keeps the copy it has, so that a container's processes share
    /// one.
    fn place(&mut self, pid: Pid, ns_pid: Option<NonZeroU32>, container: Option<&Arc<Container>>) {
        let Some(p) = self.processes.get_mut(&pid) else {
            return;
        };
        p.info.ns_pid = ns_pid;
        if ns_pid.is_none() {
            return;
        }
        if p.info.container.as_deref() != container.map(Arc::as_ref) {
            p.info.container = container.cloned();
        }
    }

    fn exit(&mut self, pid: Pid, ts: u64, code: Option<i32>) {
        let Some(p) = self.processes.get_mut(&pid) else {
            return;
        };
        if let Some(exit) = &mut p.exit {
            // The exit record and the waiter both report; keep the code whichever comes last.
            exit.code = exit.code.or(code);
            return;
        }
        let table_id = p.table;
        let mut released = Vec::new();
        let (open, snapshot) = match self.tables.get_mut(&table_id) {
            Some(table) if table.users > 1 => {
                // CLONE_FILES: the table lives on with its other users.
                table.users -= 1;
                (table.fds.len(), snapshot_of(&table.fds))
            }
            Some(_) => {
                let fds = self
                    .tables
                    .remove(&table_id)
                    .map(|t| t.fds)
                    .unwrap_or_default();
                // Not counted as closes: `closed` and the lifetimes describe what the program did.
                for fd in fds.values() {
                    if let Some(s) = self.sites.get_mut(fd.site()) {
                        s.open = s.open.saturating_sub(1);
                    }
                    released.push(fd.site());
                }
                (fds.len(), snapshot_of(&fds))
            }
            None => (0, None),
        };
        let snapshot = snapshot.unwrap_or_default();
        for (_, fd) in &snapshot {
            if let Some(s) = self.sites.get_mut(fd.site()) {
                s.held += 1;
            }
        }
        let own = self
            .processes
            .get_mut(&pid)
            .and_then(|p| p.live.take())
            .map(|live| live.sites)
            .unwrap_or_default();
        for &id in &own {
            if let Some(s) = self.sites.get_mut(id) {
                self.site_index.remove(&SiteKey {
                    pid: s.pid,
                    stack: s.stack,
                    kind: s.kind,
                    origin: s.origin,
                });
                s.retire_with_process();
            }
        }
        for &id in own.iter().chain(&released) {
            self.sites.free_if_unreferenced(id);
        }
        self.exits += 1;
        let seq = self.exits;
        let mut bytes = 0;
        if let Some(p) = self.processes.get_mut(&pid) {
            bytes = ProcessExit::bytes(&p.info, snapshot.len());
            p.exit = Some(ProcessExit {
                ts,
                code,
                open: open as u64,
                clean: snapshot.is_empty(),
                open_at_exit: snapshot,
                seq,
                bytes,
            });
        }
        self.suspects.remove(&pid);
        self.exited_kept += 1;
        self.exited_bytes += bytes as usize;
        self.exit_order.push_back((pid, seq));
        if self.exit_order.len() > 2 * MAX_EXITED_KEPT {
            // Records folded when their pid came back (a small pid_max) leave their entries.
            let processes = &self.processes;
            self.exit_order.retain(|(pid, seq)| {
                processes
                    .get(pid)
                    .and_then(|p| p.exit.as_ref())
                    .is_some_and(|e| e.seq == *seq)
            });
        }
        while self.exited_kept > MAX_EXITED_KEPT || self.exited_bytes > MAX_EXITED_BYTES {
            let Some((oldest, seq)) = self.exit_order.pop_front() else {
                break;
            };
            let current = self
                .processes
                .get(&oldest)
                .and_then(|p| p.exit.as_ref())
                .is_some_and(|e| e.seq == seq);
            if current {
                self.fold_exited(oldest);
            }
        }
    }

    /// Folds `pid`'s exit record, if it has one, into [`Model::folded`] and frees what it held.
    fn fold_exited(&mut self, pid: Pid) {
        if self.processes.get(&pid).is_none_or(Process::alive) {
            return;
        }
        let Some(p) = self.processes.remove(&pid) else {
            return;
        };
        self.exited_kept -= 1;
        let Some(exit) = p.exit else {
            return;
        };
        self.exited_bytes -= exit.bytes as usize;
        if exit.clean {
            self.folded.clean(&p.info.comm);
            return;
        }
        let mut groups: BTreeMap<FoldedKey, u64> = BTreeMap::new();
        for (_, fd) in &exit.open_at_exit {
            let Some(s) = self.sites.get_mut(fd.site()) else {
                continue;
            };
            s.held = s.held.saturating_sub(1);
            let key = FoldedKey {
                comm: p.info.comm.clone(),
                kind: s.kind,
                origin: s.origin,
                stack: s.stack,
            };
            *groups.entry(key).or_default() += 1;
            self.sites.free_if_unreferenced(fd.site());
        }
        self.folded.with_open(groups);
    }

    /// Records `code` for a process whose exit was already seen (from waitpid).
    pub fn set_exit_code(&mut self, pid: Pid, code: i32) {
        if let Some(exit) = self.processes.get_mut(&pid).and_then(|p| p.exit.as_mut()) {
            exit.code = Some(code);
        }
    }

    fn fail(&mut self, pid: Pid, tid: u32, ts: u64, syscall: u32, errno: Errno, stack: StackId) {
        self.ensure(pid, ts);
        self.incidents_total += 1;
        if self.incidents.len() >= MAX_INCIDENTS {
            return;
        }
        let blame = self.blame(pid);
        for &(site, _) in &blame {
            if let Some(s) = self.sites.get_mut(site) {
                s.pinned = true;
            }
        }
        let incident = Incident {
            ts,
            pid,
            tid,
            syscall,
            errno,
            open_fds: self.open_count(pid),
            limit: self.processes[&pid].info.limit.soft,
            stack,
            blame,
            listen: None,
        };
        self.incidents.push(incident);
    }

    /// The sites holding `pid`'s descriptors now, most first.
    pub fn blame(&self, pid: Pid) -> Vec<(SiteId, u64)> {
        let mut blame: Vec<(SiteId, u64)> = self
            .site_ids(pid)
            .map(|(id, s)| (id, s.open))
            .filter(|&(_, n)| n > 0)
            .collect();
        blame.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        blame
    }

    fn site_ids(&self, pid: Pid) -> impl Iterator<Item = (SiteId, &CallSite)> {
        let p = self.processes.get(&pid);
        let live = p
            .and_then(|p| p.live.as_deref())
            .map(|l| l.sites.iter().copied());
        // An exited process's: those its descriptors at exit came from, once each.
        let exited = p.and_then(|p| p.exit.as_ref()).map(|e| {
            let mut ids: Vec<SiteId> = e.open_at_exit.iter().map(|(_, f)| f.site()).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        });
        live.into_iter()
            .flatten()
            .chain(exited.into_iter().flatten())
            .filter_map(move |id| Some((id, self.sites.get(id).filter(|s| s.pid == pid)?)))
    }

    /// The sites of `pid`, for views: all of a live process's, and those of an exited one
    /// that its descriptors open at exit came from.
    pub fn sites_of(&self, pid: Pid) -> impl Iterator<Item = &CallSite> {
        self.site_ids(pid).map(|(_, s)| s)
    }

    /// Net descriptors a site gained per minute over the recent window.
    pub fn site_growth_per_min(&self, site: &CallSite) -> f64 {
        growth_per_min(site.samples(&self.ticks))
    }

    /// Makes `pid`'s table what the kernel's was at its exit (see [`Event::ExitTable`]). No
    /// race to wait out as with /proc: every thread is gone, and every record they wrote came
    /// before this one.
    fn exit_table(&mut self, pid: Pid, ts: u64, covered: i32, open: &[u8]) {
        let is_open = |fd: i32| {
            open.get((fd / 8) as usize)
                .is_some_and(|b| b >> (fd % 8) & 1 == 1)
        };
        let Some(table) = self.table_mut(pid) else {
            return;
        };
        let stale: Vec<i32> = table
            .fds
            .iter()
            .map(|(n, _)| n)
            .filter(|&n| n < covered && !is_open(n))
            .collect();
        let unknown: Vec<i32> = (0..covered.min(open.len() as i32 * 8))
            .filter(|&n| is_open(n) && table.fds.get(n).is_none())
            .collect();
        for n in stale {
            self.close(pid, ts, n);
            self.corrections.removed += 1;
        }
        for fd in unknown {
            let new = NewFd {
                fd,
                kind: FdKind::Other,
                target: Arc::from("(created while events were lost)"),
                cloexec: false,
            };
            self.open(pid, ts, &new, NO_STACK, Origin::Reconciled);
            self.corrections.added += 1;
        }
    }

    fn reconcile(&mut self, pid: Pid, ts: u64, listed: &[NewFd]) {
        let Some(table) = self.table_mut(pid) else {
            return;
        };
        let listed_map: HashMap<i32, &NewFd> = listed.iter().map(|f| (f.fd, f)).collect();
        let missing: Vec<(i32, FdKind)> = table
            .fds
            .iter()
            .filter(|(n, f)| listed_map.get(n).is_none_or(|l| l.kind != f.kind))
            .map(|(n, f)| (n, f.kind))
            .collect();
        let unknown: Vec<(i32, FdKind)> = listed
            .iter()
            .filter(|l| table.fds.get(l.fd).is_none_or(|f| f.kind != l.kind))
            .map(|l| (l.fd, l.kind))
            .collect();
        let previous = self.suspects.remove(&pid).unwrap_or_default();
        for &(n, kind) in missing.iter().filter(|m| previous.missing.contains(m)) {
            if self
                .table_mut(pid)
                .is_some_and(|t| t.fds.get(n).is_some_and(|f| f.kind == kind))
            {
                self.close(pid, ts, n);
                self.corrections.removed += 1;
            }
        }
        for &(n, _) in unknown.iter().filter(|u| previous.unknown.contains(u)) {
            if let Some(new) = listed_map.get(&n) {
                self.open(pid, ts, new, NO_STACK, Origin::Reconciled);
                self.corrections.added += 1;
            }
        }
        let still = |v: Vec<(i32, FdKind)>, prev: &[(i32, FdKind)]| -> Vec<(i32, FdKind)> {
            v.into_iter().filter(|x| !prev.contains(x)).collect()
        };
        self.suspects.insert(
            pid,
            Suspects {
                missing: still(missing, &previous.missing),
                unknown: still(unknown, &previous.unknown),
            },
        );
    }

    fn tick(&mut self, ts: u64) {
        self.corrections.reused += self.displaced.expire(ts);
        // A reopened close whose creation displaced nothing (the number was a dup2 target, or
        // the creation was lost) explains nothing.
        self.reopened_closes.expire(ts);
        let counts: Vec<(Pid, u64)> = self
            .processes
            .values()
            .filter(|p| p.alive())
            .map(|p| (p.pid, self.open_count(p.pid)))
            .collect();
        for (pid, open) in counts {
            if let Some(live) = self.processes.get_mut(&pid).and_then(|p| p.live.as_mut()) {
                push_sample(&mut live.samples, ts, open);
            }
        }
        if self.ticks.len() == GROWTH_WINDOW {
            self.ticks.pop_front();
        }
        self.ticks.push_back(ts);
        for s in self.sites.iter_mut() {
            s.sample();
        }
    }

    /// The time the last tick carried (0 before the first).
    pub fn last_tick_ns(&self) -> u64 {
        self.ticks.back().copied().unwrap_or(0)
    }

    /// Seconds until `pid` reaches its soft limit at its current growth, if it is growing.
    pub fn forecast_secs(&self, pid: Pid) -> Option<f64> {
        let p = self.processes.get(&pid)?;
        let growth = p.growth_per_min();
        let open = self.open_count(pid);
        if growth <= 0.0 || p.info.limit.soft == u64::MAX {
            return None;
        }
        Some(p.info.limit.soft.saturating_sub(open) as f64 / (growth / 60.0))
    }
}

/// What an exiting process's table says about it: `None` when it is clean (nothing open but
/// stdio, see [`ProcessExit::clean`]), else its descriptors.
fn snapshot_of(fds: &FdMap) -> Option<Box<[(i32, OpenFd)]>> {
    if fds.keys().all(|n| n <= 2) {
        return None;
    }
    Some(fds.iter().map(|(n, f)| (n, f.clone())).collect())
}

impl Process {
    fn new(pid: Pid, info: ProcessInfo, table: TableId, ts: u64) -> Self {
        Self {
            pid,
            info,
            table,
            peak_open: 0,
            started_ns: ts,
            exit: None,
            live: Some(Box::default()),
        }
    }
}

fn push_sample(samples: &mut VecDeque<(u64, u64)>, ts: u64, value: u64) {
    if samples.len() == GROWTH_WINDOW {
        samples.pop_front();
    }
    samples.push_back((ts, value));
}

/// Least-squares slope of the samples, per minute.
fn growth_per_min(samples: impl Iterator<Item = (u64, u64)> + Clone) -> f64 {
    let mut points = samples.clone();
    let Some((t0, _)) = points.next() else {
        return 0.0;
    };
    let n = samples.clone().count();
    if n < 2 {
        return 0.0;
    }
    let n = n as f64;
    let xs = samples.clone().map(|(t, _)| (t - t0) as f64 / 1e9);
    let mean_x = xs.clone().sum::<f64>() / n;
    let mean_y = samples.clone().map(|(_, v)| v as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (x, (_, v)) in xs.zip(samples) {
        num += (x - mean_x) * (v as f64 - mean_y);
        den += (x - mean_x) * (x - mean_x);
    }
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

mod fd_map;
mod folded;
mod sites;
#[cfg(test)]
mod tests;
