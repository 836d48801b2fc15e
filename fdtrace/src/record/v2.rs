//! Format 2, read only: what changed since is spelled out here as it was, so that postcard,
//! which writes no field names, decodes the old layout; [`Chunk::upgrade`] gives the current
//! types with the new fields at their defaults.
//!
//! Format 2 lacked `ns_pid` and `container` on processes (in `Attached` and `Exec`) and on
//! forked children. Unknown, the pid in the process's namespace shows as its pid and the
//! container as none.

use serde::{Deserialize, Serialize};

use super::format::{self, Header};
use crate::{
    model::{self, Errno, Limit, NewFd, Pid, StackId},
    stack::Frame,
};

/// A chunk as format 2 wrote it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Chunk {
    Header(Header),
    Entries(Vec<Entry>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    Stack { id: StackId, frames: Vec<Frame> },
    Event(Event),
    ExitCode { pid: Pid, code: i32 },
    Finished { events: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub ppid: Pid,
    pub comm: String,
    pub exe: String,
    pub limit: Limit,
}

/// [`model::Event`] in format 2: the variants in the same order, as postcard numbers them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Attached {
        pid: Pid,
        ts: u64,
        info: ProcessInfo,
        fds: Vec<NewFd>,
    },
    Opened {
        pid: Pid,
        tid: u32,
        ts: u64,
        syscall: u32,
        fds: Vec<NewFd>,
        stack: StackId,
    },
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
    Fetched {
        pid: Pid,
        tid: u32,
        ts: u64,
        pidfd: i32,
        remote_fd: i32,
        to: i32,
        stack: StackId,
    },
    Closed {
        pid: Pid,
        ts: u64,
        fd: i32,
        reopened: bool,
    },
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
    Exec {
        pid: Pid,
        ts: u64,
        info: ProcessInfo,
    },
    Forked {
        parent: Pid,
        child: Pid,
        ts: u64,
        shares_table: bool,
    },
    Exited {
        pid: Pid,
        ts: u64,
        code: Option<i32>,
    },
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
    Reconciled {
        pid: Pid,
        ts: u64,
        fds: Vec<NewFd>,
    },
    Lost {
        count: u64,
    },
    Tick {
        ts: u64,
    },
}

impl Chunk {
    pub fn upgrade(self) -> format::Chunk {
        match self {
            Chunk::Header(header) => format::Chunk::Header(header),
            Chunk::Entries(entries) => {
                format::Chunk::Entries(entries.into_iter().map(Entry::upgrade).collect())
            }
        }
    }
}

impl Entry {
    fn upgrade(self) -> format::Entry {
        match self {
            Entry::Stack { id, frames } => format::Entry::Stack { id, frames },
            Entry::Event(event) => format::Entry::Event(event.upgrade()),
            Entry::ExitCode { pid, code } => format::Entry::ExitCode { pid, code },
            Entry::Finished { events } => format::Entry::Finished { events },
        }
    }
}

impl ProcessInfo {
    fn upgrade(self) -> model::ProcessInfo {
        model::ProcessInfo {
            ppid: self.ppid,
            ns_pid: None,
            comm: self.comm,
            exe: self.exe,
            limit: self.limit,
            container: None,
        }
    }
}

impl Event {
    fn upgrade(self) -> model::Event {
        use model::Event as E;
        match self {
            Event::Attached { pid, ts, info, fds } => E::Attached {
                pid,
                ts,
                info: info.upgrade(),
                fds,
            },
            Event::Opened {
                pid,
                tid,
                ts,
                syscall,
                fds,
                stack,
            } => E::Opened {
                pid,
                tid,
                ts,
                syscall,
                fds,
                stack,
            },
            Event::Duplicated {
                pid,
                tid,
                ts,
                syscall,
                from,
                to,
                cloexec,
                stack,
            } => E::Duplicated {
                pid,
                tid,
                ts,
                syscall,
                from,
                to,
                cloexec,
                stack,
            },
            Event::Fetched {
                pid,
                tid,
                ts,
                pidfd,
                remote_fd,
                to,
                stack,
            } => E::Fetched {
                pid,
                tid,
                ts,
                pidfd,
                remote_fd,
                to,
                stack,
            },
            Event::Closed {
                pid,
                ts,
                fd,
                reopened,
            } => E::Closed {
                pid,
                ts,
                fd,
                reopened,
            },
            Event::ClosedRange {
                pid,
                ts,
                first,
                last,
                cloexec_only,
                unshare,
            } => E::ClosedRange {
                pid,
                ts,
                first,
                last,
                cloexec_only,
                unshare,
            },
            Event::CloexecSet { pid, fd, cloexec } => E::CloexecSet { pid, fd, cloexec },
            Event::Exec { pid, ts, info } => E::Exec {
                pid,
                ts,
                info: info.upgrade(),
            },
            Event::Forked {
                parent,
                child,
                ts,
                shares_table,
            } => E::Forked {
                parent,
                child,
                ts,
                shares_table,
                ns_pid: None,
                container: None,
            },
            Event::Exited { pid, ts, code } => E::Exited { pid, ts, code },
            Event::Failed {
                pid,
                tid,
                ts,
                syscall,
                errno,
                stack,
            } => E::Failed {
                pid,
                tid,
                ts,
                syscall,
                errno,
                stack,
            },
            Event::LimitChanged { pid, limit } => E::LimitChanged { pid, limit },
            Event::Reconciled { pid, ts, fds } => E::Reconciled { pid, ts, fds },
            Event::Lost { count } => E::Lost { count },
            Event::Tick { ts } => E::Tick { ts },
        }
    }
}
