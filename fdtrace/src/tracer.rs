//! Turns probe [`Record`]s into model [`Event`]s: syscall semantics, /proc facts for new
//! processes, and stacks unwound and interned as they arrive.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, PoisonError, RwLock},
};

// Every stack-bearing event is looked up by its raw frames: SipHash was a tenth of the
// tracer's time on a tight open/close loop.
use foldhash::HashMap;

use fdtrace_common::{MEMO_CHECKS, Memo, MemoKey, PyProc, kind, syscalls as sc};

use crate::{
    decode::Record,
    mmap_events::MapEvent,
    model::{Ended, Errno, Event, FdKind, NO_STACK, NewFd, ProcessInfo, StackId},
    procfs, python,
    stack::{Frame, Lang, RawFrame, StackMemo, Symbolizer, Unwinder},
};

const O_CLOEXEC: u64 = 0o2_000_000;
const CLONE_FILES: u64 = 0x400;
const CLOSE_RANGE_UNSHARE: u64 = 2;
const CLOSE_RANGE_CLOEXEC: u64 = 4;

/// Symbolized stacks by id. Ids start at 1; [`NO_STACK`] has no frames.
#[derive(Debug, Default)]
pub struct Stacks {
    frames: Vec<Arc<[Frame]>>,
}

impl Stacks {
    pub fn get(&self, id: StackId) -> &[Frame] {
        match id.checked_sub(1) {
            Some(i) => self.frames.get(i as usize).map_or(&[], |f| f),
            None => &[],
        }
    }

    /// Adds a symbolized stack and returns its id (recordings restore stacks this way).
    pub fn push(&mut self, frames: Vec<Frame>) -> StackId {
        self.frames.push(frames.into());
        self.frames.len() as StackId
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// A stack as captured: native frames by object and offset in it, and Python frames as (code
/// object, instruction). Not by address: each exec'd process maps its objects elsewhere
/// (ASLR), and keyed by addresses this table grew with every short-lived child's stacks.
type StackKey = (Vec<(Option<Arc<str>>, u64)>, Vec<(u64, u64)>);

/// The frame that stands for the callers of a creation whose stack the probe skipped under
/// load (the ring over half full): the report names it as the place.
pub const SKIPPED_FRAME: &str = "[stack skipped under load]";

/// Past this many entries [`Tracer::interned`] starts over: it only spares symbolizing a
/// stack again (its id comes from `by_location`), and Python frames name code objects by
/// address, which differ in every process.
const MAX_INTERNED: usize = 65_536;

pub struct Tracer {
    unwinder: Unwinder,
    /// Native stacks by the registers and stack words they were unwound from; the ring
    /// reader consults it too.
    pub memo: Arc<RwLock<StackMemo>>,
    symbolizer: Symbolizer,
    python: python::Resolver,
    /// CPython interpreters found (or gone, `None`) since the session last looked: the probe's
    /// Python map must follow.
    pub python_changes: Vec<(u32, Option<PyProc>)>,
    /// Stack ids by the captured frames (see [`StackKey`]), bounded by [`MAX_INTERNED`].
    interned: HashMap<StackKey, StackId>,
    /// Symbolized stacks by what they say, so that raw stacks differing only in addresses
    /// (an unrolled loop's several calls on one line) are one call site.
    by_location: HashMap<Vec<Location>, StackId>,
    pub stacks: Stacks,
    /// Stack ids of captures without stack bytes (`--stack-bytes 0`, a stack the probe could
    /// not read, or one it skipped under load), by process, instruction pointer and whether
    /// skipped (which adds [`SKIPPED_FRAME`]): the ip is all there is to unwind, and unwinding
    /// it for every record made those records the slowest to ingest.
    by_ip: HashMap<(u32, u64, bool), StackId>,
    /// Memos for the probe to recognize call sites by, since the session last took them.
    pub kernel_memos: Vec<(MemoKey, Memo)>,
    /// Processes whose memos were dropped since the session last looked: the probe's go too.
    pub forgotten_memos: Vec<u32>,
}

/// A frame as a reader tells it apart: where, not at which address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Location {
    function: Option<String>,
    file: Option<String>,
    line: Option<u32>,
    module: Option<String>,
    /// Only for frames nothing resolved, which have nothing else to go by.
    offset: Option<u64>,
}

impl From<&Frame> for Location {
    fn from(f: &Frame) -> Self {
        let unresolved = f.function.is_none() && f.file.is_none();
        // Placed in no mapping, the address is all there is, and it means nothing in another
        // process (see `placed_nowhere`): such frames are one location.
        let nowhere = f.module.is_none() && f.offset == f.addr;
        Self {
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            module: f.module.clone(),
            offset: (unresolved && !nowhere).then_some(f.offset),
        }
    }
}

/// The unwinder placed this frame in no mapping: the process's mappings were not known yet
/// (a child that execs and exits within milliseconds can beat its mapping reports) or the
/// address is garbage. Its address is where ASLR put something this time, so keyed by it
/// every such child made a stack and a call site of its own, and the tables grew by the child.
fn placed_nowhere(f: &RawFrame) -> bool {
    f.module.is_none() && f.file_offset == f.addr
}

impl Default for Tracer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracer {
    pub fn new() -> Self {
        Self {
            unwinder: Unwinder::new(),
            memo: Arc::default(),
            symbolizer: Symbolizer::new(),
            python: python::Resolver::default(),
            python_changes: Vec::new(),
            interned: HashMap::default(),
            by_location: HashMap::default(),
            stacks: Stacks::default(),
            by_ip: HashMap::default(),
            kernel_memos: Vec::new(),
            forgotten_memos: Vec::new(),
        }
    }

    /// The event that starts tracing `pid`: who it is and what it has open now.
    pub fn attach(&mut self, pid: u32, ts: u64) -> std::io::Result<Event> {
        let info = process_info(pid)?;
        let fds = procfs::fds(pid)?;
        // Without maps we still trace, with unresolved frames.
        let _ = self.unwinder.refresh(pid);
        self.find_python(pid);
        Ok(Event::Attached { pid, ts, info, fds })
    }

    /// Applies what the kernel reported about a launched process's mappings.
    pub fn mapping(&mut self, event: &MapEvent) {
        match event {
            MapEvent::Map { pid, mapping, .. } => {
                self.unwinder.map(*pid, mapping);
                // A new mapping may take the place of an unmapped one (dlclose, then dlopen):
                // the same addresses would then unwind differently.
                self.forget_memos(*pid);
            }
            // The interpreter of the new image (if any) was registered early from its
            // mapping report; the probe itself dropped the old one at exec.
            MapEvent::Exec { pid, .. } => self.unwinder.exec_reported(*pid),
        }
    }

    /// Registers the CPython interpreter a mapping report reveals, ahead of the records that
    /// precede it in time (see `Session::pump`).
    pub fn early_python(&mut self, event: &MapEvent) {
        if let MapEvent::Map { pid, mapping, .. } = event
            && python::version_of(&mapping.path).is_some()
            && let Some(found) = python::detect(*pid, &mapping.path, mapping.start, mapping.offset)
        {
            self.python.register(*pid, found.layout);
            self.python_changes.push((*pid, Some(found.proc)));
        }
    }

    fn forget_memos(&mut self, pid: u32) {
        self.memo
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(pid);
        self.by_ip.retain(|(p, _, _), _| *p != pid);
        self.forgotten_memos.push(pid);
    }

    /// Looks for CPython in a process's /proc maps (attached processes).
    fn find_python(&mut self, pid: u32) {
        if let Some(found) = python::detect_in_process(pid) {
            self.python.register(pid, found.layout);
            self.python_changes.push((pid, Some(found.proc)));
        }
    }

    /// The model events a record stands for (none for irrelevant ones).
    pub fn translate(&mut self, rec: &Record) -> Vec<Event> {
        let h = &rec.header;
        let (pid, tid, ts, a) = (h.tgid, h.tid, h.ts_ns, h.args);
        match h.kind {
            kind::FORK => {
                let child = a[0] as u32;
                self.unwinder.fork(pid, child);
                self.python.fork(pid, child);
                // The child's pid in its namespace is its own, and `unshare --pid` puts even a
                // plain fork's child in another namespace: /proc says, while the child lives.
                // One gone already keeps its parent's container, its pid there unknown.
                let placement = procfs::placement(child);
                vec![Event::Forked {
                    parent: pid,
                    child,
                    ts,
                    shares_table: a[1] & CLONE_FILES != 0,
                    ns_pid: placement.as_ref().map(|p| p.ns_pid),
                    container: placement.and_then(|p| p.container).map(Arc::new),
                }]
            }
            kind::EXIT => {
                self.unwinder.forget(pid);
                self.python.forget(pid);
                self.forget_memos(pid);
                let exited = Event::Exited {
                    pid,
                    ts,
                    code: None,
                };
                if rec.aux.is_empty() {
                    return vec![exited];
                }
                vec![exit_table(pid, ts, a[1], &rec.aux), exited]
            }
            kind::EXEC => {
                // A launched process's new mappings arrive as map events; an attached one's
                // are read from /proc.
                // The probe dropped the process from its Python map at exec. A launched
                // process's new interpreter was already found in its mapping reports, which
                // come before this record.
                self.forget_memos(pid);
                if !self.unwinder.is_reported(pid) {
                    self.python.forget(pid);
                    let _ = self.unwinder.refresh(pid);
                    self.find_python(pid);
                }
                let comm: Vec<u8> = a[..2]
                    .iter()
                    .flat_map(|w| w.to_ne_bytes())
                    .take_while(|&c| c != 0)
                    .collect();
                // Read late, the process may have exited: then the model keeps what it knew.
                let placement = procfs::placement(pid);
                let info = ProcessInfo {
                    ppid: 0,
                    ns_pid: placement.as_ref().map(|p| p.ns_pid),
                    comm: String::from_utf8_lossy(&comm).into_owned(),
                    exe: String::from_utf8_lossy(&rec.aux).into_owned(),
                    limit: crate::model::Limit::default(),
                    container: placement.and_then(|p| p.container).map(Arc::new),
                };
                vec![Event::Exec { pid, ts, info }]
            }
            kind::SYSCALL => Self::change(pid, ts, h.nr, &a),
            kind::UPSTREAM => {
                let peer: Arc<str> = if rec.aux.is_empty() {
                    Arc::from("")
                } else {
                    Arc::from(peer(&rec.aux))
                };
                let Some(ended) = Ended::from_probe(a[sc::UPSTREAM_ENDED]) else {
                    return vec![Event::UpstreamFailed {
                        pid,
                        ts,
                        fd: a[0] as i32,
                        syscall: h.nr,
                        errno: a[5] as u16,
                        peer,
                    }];
                };
                vec![Event::UpstreamEnded {
                    pid,
                    ts,
                    fd: a[0] as i32,
                    ended,
                    duration_ns: a[sc::UPSTREAM_DURATION],
                    peer,
                }]
            }
            kind::CODE => {
                let copies = crate::decode::code_copies(rec);
                self.python.learn_code(pid, a[0], &copies);
                Vec::new()
            }
            kind::STACKED => {
                let stack = self.intern(rec);
                if h.ret < 0 {
                    let errno = if -h.ret == sc::ENFILE {
                        Errno::Enfile
                    } else {
                        Errno::Emfile
                    };
                    let failed = Event::Failed {
                        pid,
                        tid,
                        ts,
                        syscall: h.nr,
                        errno,
                        stack,
                    };
                    if h.nr != sc::ACCEPT && h.nr != sc::ACCEPT4 {
                        return vec![failed];
                    }
                    return match listen(pid, &a) {
                        Some(listen) => vec![failed, Event::Listen { pid, ts, listen }],
                        None => vec![failed],
                    };
                }
                vec![create(pid, tid, ts, h.nr, h.ret, &a, &rec.aux, stack)]
            }
            _ => Vec::new(),
        }
    }

    fn change(pid: u32, ts: u64, nr: u32, a: &[u64; 6]) -> Vec<Event> {
        let event = match nr {
            sc::CLOSE => {
                let closed = Event::Closed {
                    pid,
                    ts,
                    fd: a[0] as i32,
                    reopened: a[sc::CLOSE_REOPENED] != 0,
                };
                let bits = a[sc::CLOSE_UNANSWERED];
                if bits & sc::UNANSWERED == 0 {
                    return vec![closed];
                }
                // Before the close, while the model still holds the descriptor.
                let unanswered = Event::Unanswered {
                    pid,
                    ts,
                    fd: a[0] as i32,
                    request_waiting: bits & sc::REQUEST_WAITING != 0,
                };
                return vec![unanswered, closed];
            }
            sc::CLOSE_RANGE => Event::ClosedRange {
                pid,
                ts,
                first: a[0] as u32,
                last: a[1] as u32,
                cloexec_only: a[2] & CLOSE_RANGE_CLOEXEC != 0,
                unshare: a[2] & CLOSE_RANGE_UNSHARE != 0,
            },
            sc::FCNTL => Event::CloexecSet {
                pid,
                fd: a[0] as i32,
                cloexec: a[2] & 1 != 0,
            },
            sc::IOCTL => Event::CloexecSet {
                pid,
                fd: a[0] as i32,
                cloexec: a[1] == sc::FIOCLEX,
            },
            sc::SETRLIMIT | sc::PRLIMIT64 => {
                let target = if nr == sc::PRLIMIT64 && a[0] != 0 {
                    a[0] as u32
                } else {
                    pid
                };
                Event::LimitChanged {
                    pid: target,
                    limit: crate::model::Limit {
                        soft: a[4],
                        hard: a[5],
                    },
                }
            }
            _ => return Vec::new(),
        };
        vec![event]
    }

    /// Unwinds the record's stack and returns its id, symbolizing stacks seen for the first time.
    fn intern(&mut self, rec: &Record) -> StackId {
        let Some(cap) = &rec.stack else {
            return NO_STACK;
        };
        if let Some(id) = cap.known {
            return id;
        }
        let pid = rec.header.tgid;
        let ip_only = cap.bytes.is_empty() && rec.py.is_empty();
        if ip_only && let Some(id) = self.by_ip.get(&(pid, cap.ip, cap.skipped)) {
            return *id;
        }
        // Python stacks also depend on the interpreter's frames: they are not memoized.
        let native = rec.py.is_empty();
        let mut reads = Vec::new();
        let unwound = self.unwinder.unwind_reading(
            pid,
            cap.ip,
            cap.sp,
            cap.bp,
            &cap.bytes,
            native.then_some(&mut reads),
        );
        let id = self.intern_frames(pid, &unwound.frames, rec, cap.skipped);
        if ip_only {
            if self.by_ip.len() >= MAX_INTERNED {
                self.by_ip.clear();
            }
            self.by_ip.insert((pid, cap.ip, cap.skipped), id);
            // A stack skipped under load says nothing of the site: with stacks on, the
            // probe's memos are found by (ip, sp) and need the stack's words.
            if cap.skipped {
                return id;
            }
            // With stacks off the probe finds the memo by ip alone (sp 0) and compares nothing.
            let kernel = Memo {
                site: id,
                span: 0,
                bp: 0,
                bp_matters: 0,
                count: 0,
                reach: 0,
                pad: 0,
                offsets: [0; MEMO_CHECKS],
                words: [0; MEMO_CHECKS],
            };
            self.kernel_memos.push((memo_key(pid, cap.ip, 0), kernel));
            return id;
        }
        if native && let Some(space) = unwound.space {
            let regs = (cap.ip, cap.sp, cap.bp);
            let raw = crate::stack::raw_digest(&unwound.frames);
            let mut memo = self.memo.write().unwrap_or_else(PoisonError::into_inner);
            memo.insert(pid, regs, space, reads, (raw, id));
            if let Some(kernel) = memo.kernel_memo(pid, (cap.ip, cap.sp), cap.bytes.len()) {
                self.kernel_memos
                    .push((memo_key(pid, cap.ip, cap.sp), kernel));
            }
        }
        id
    }

    /// The id of an unwound stack (plus the record's Python frames), symbolizing it if new.
    /// A stack the probe `skipped` under load ends in [`SKIPPED_FRAME`]: its syscall's frame
    /// alone would pass for a call site of its own, the libc wrapper, into which every
    /// skipped creation of the program would merge.
    fn intern_frames(
        &mut self,
        pid: u32,
        frames: &[RawFrame],
        rec: &Record,
        skipped: bool,
    ) -> StackId {
        if frames.is_empty() && rec.py.is_empty() && !skipped {
            return NO_STACK;
        }
        let key: StackKey = (
            frames
                .iter()
                .map(|f| {
                    let offset = if placed_nowhere(f) {
                        u64::MAX
                    } else {
                        f.file_offset
                    };
                    (f.module.clone(), offset)
                })
                .chain(skipped.then(|| (Some(Arc::from(SKIPPED_FRAME)), u64::MAX)))
                .collect(),
            rec.py.iter().map(|f| (f.code, f.instr)).collect(),
        );
        if let Some(&id) = self.interned.get(&key) {
            return id;
        }
        let unwinder = &self.unwinder;
        let native = self
            .symbolizer
            .symbolize_with(frames, &|module| unwinder.open_path(module));
        let mut symbolized = python::merge(native, self.python.resolve(pid, &rec.py));
        if skipped {
            symbolized.push(Frame::named(SKIPPED_FRAME, Lang::Native));
        }
        // In a Python stack the interpreter's own native frames change as CPython specialises
        // a call site; the Python frames and the rest say where the descriptor came from.
        let python = !rec.py.is_empty();
        let location: Vec<Location> = symbolized
            .iter()
            .filter(|f| !(python && python::is_interpreter_frame(f)))
            .map(Location::from)
            .collect();
        let id = *self
            .by_location
            .entry(location)
            .or_insert_with(|| self.stacks.push(symbolized));
        if self.interned.len() >= MAX_INTERNED {
            self.interned.clear();
        }
        self.interned.insert(key, id);
        id
    }
}

fn process_info(pid: u32) -> std::io::Result<ProcessInfo> {
    let id = procfs::identity(pid)?;
    let limit = procfs::limit(pid).unwrap_or_default();
    let placement = procfs::placement(pid);
    Ok(ProcessInfo {
        ppid: id.ppid,
        ns_pid: placement.as_ref().map(|p| p.ns_pid),
        comm: id.comm,
        exe: id.exe,
        limit,
        container: placement.and_then(|p| p.container).map(Arc::new),
    })
}

/// The listening socket's state the probe put in a failed accept's record, if it could read it.
fn listen(pid: u32, a: &[u64; 6]) -> Option<crate::model::Listen> {
    let queue = a[sc::ACCEPT_QUEUE];
    let at = a[sc::ACCEPT_LISTEN];
    if queue == 0 && at == 0 {
        return None;
    }
    let port = (at & 0xffff) as u16;
    let address = if at & sc::LISTEN_IPV4 != 0 {
        // The address as the kernel stores it (network order), read as a native u32.
        let ip = Ipv4Addr::from(((at >> 16) as u32).to_ne_bytes());
        format!("{ip}:{port}")
    } else if at & sc::LISTEN_IPV6 != 0 {
        procfs::listening_v6(pid, port).unwrap_or_else(|| format!("[?]:{port}"))
    } else {
        String::new()
    };
    Some(crate::model::Listen {
        fd: a[0] as i32,
        address,
        queued: queue as u32,
        backlog: (queue >> 32) as u32,
    })
}

fn memo_key(tgid: u32, ip: u64, sp: u64) -> MemoKey {
    MemoKey {
        tgid,
        pad: 0,
        ip,
        sp,
    }
}

/// The creation event for a successful creating syscall.
#[expect(
    clippy::too_many_arguments,
    reason = "the fields of one record, unpacked once"
)]
fn create(
    pid: u32,
    tid: u32,
    ts: u64,
    nr: u32,
    ret: i64,
    a: &[u64; 6],
    aux: &[u8],
    stack: StackId,
) -> Event {
    let fd = ret as i32;
    let one = |kind: FdKind, target: String, cloexec: bool| Event::Opened {
        pid,
        tid,
        ts,
        syscall: nr,
        fds: vec![NewFd {
            fd,
            kind,
            target: Arc::from(target),
            cloexec,
        }],
        stack,
    };
    let pair = |kind: FdKind, target: &str, cloexec: bool| {
        let (a, b) = fd_pair(aux);
        let target: Arc<str> = Arc::from(target);
        Event::Opened {
            pid,
            tid,
            ts,
            syscall: nr,
            fds: [a, b]
                .into_iter()
                .map(|fd| NewFd {
                    fd,
                    kind,
                    target: target.clone(),
                    cloexec,
                })
                .collect(),
            stack,
        }
    };
    let dup = |from: u64, cloexec: bool| Event::Duplicated {
        pid,
        tid,
        ts,
        syscall: nr,
        from: from as i32,
        to: fd,
        cloexec,
        stack,
    };
    let path = || String::from_utf8_lossy(aux).into_owned();
    let has = |flags: u64, bit: u64| flags & bit != 0;
    match nr {
        sc::OPEN => one(FdKind::File, path(), has(a[1], O_CLOEXEC)),
        sc::OPENAT => one(FdKind::File, path(), has(a[2], O_CLOEXEC)),
        sc::CREAT => one(FdKind::File, path(), false),
        // The probe copies open_how.flags into args[4].
        sc::OPENAT2 => one(FdKind::File, path(), has(a[4], O_CLOEXEC)),
        sc::OPEN_BY_HANDLE_AT => one(FdKind::File, "(by handle)".into(), has(a[2], O_CLOEXEC)),
        sc::SOCKET => one(
            FdKind::Socket,
            socket_name(a[0], a[1], a[2]),
            has(a[1], O_CLOEXEC),
        ),
        sc::ACCEPT => one(FdKind::Socket, peer(aux), false),
        sc::ACCEPT4 => one(FdKind::Socket, peer(aux), has(a[3], O_CLOEXEC)),
        sc::SOCKETPAIR => pair(FdKind::Socket, "socketpair", has(a[1], O_CLOEXEC)),
        sc::PIPE => pair(FdKind::Pipe, "pipe", false),
        sc::PIPE2 => pair(FdKind::Pipe, "pipe", has(a[1], O_CLOEXEC)),
        sc::DUP | sc::DUP2 => dup(a[0], false),
        sc::DUP3 => dup(a[0], has(a[2], O_CLOEXEC)),
        sc::FCNTL => dup(a[0], a[1] == sc::F_DUPFD_CLOEXEC),
        sc::EPOLL_CREATE => one(FdKind::Epoll, "epoll".into(), false),
        sc::EPOLL_CREATE1 => one(FdKind::Epoll, "epoll".into(), has(a[0], O_CLOEXEC)),
        sc::EVENTFD => one(FdKind::Eventfd, "eventfd".into(), false),
        sc::EVENTFD2 => one(FdKind::Eventfd, "eventfd".into(), has(a[1], O_CLOEXEC)),
        sc::TIMERFD_CREATE => one(FdKind::Timerfd, "timerfd".into(), has(a[1], O_CLOEXEC)),
        sc::SIGNALFD => one(FdKind::Signalfd, "signalfd".into(), false),
        sc::SIGNALFD4 => one(FdKind::Signalfd, "signalfd".into(), has(a[3], O_CLOEXEC)),
        sc::INOTIFY_INIT => one(FdKind::Inotify, "inotify".into(), false),
        sc::INOTIFY_INIT1 => one(FdKind::Inotify, "inotify".into(), has(a[0], O_CLOEXEC)),
        // FAN_CLOEXEC and MFD_CLOEXEC are bit 0.
        sc::FANOTIFY_INIT => one(FdKind::Fanotify, "fanotify".into(), has(a[0], 1)),
        sc::MEMFD_CREATE => one(FdKind::Memfd, format!("memfd:{}", path()), has(a[1], 1)),
        // pidfds, io_uring and bpf descriptors are always close-on-exec.
        sc::PIDFD_OPEN => one(FdKind::Pidfd, format!("pid {}", a[0]), true),
        // The model knows what the remote descriptor is when its process is traced.
        sc::PIDFD_GETFD => Event::Fetched {
            pid,
            tid,
            ts,
            pidfd: a[0] as i32,
            remote_fd: a[1] as i32,
            to: fd,
            stack,
        },
        sc::USERFAULTFD => one(
            FdKind::Userfaultfd,
            "userfaultfd".into(),
            has(a[0], O_CLOEXEC),
        ),
        // PERF_FLAG_FD_CLOEXEC
        sc::PERF_EVENT_OPEN => one(FdKind::Perf, "perf_event".into(), has(a[4], 8)),
        sc::IO_URING_SETUP => one(FdKind::IoUring, "io_uring".into(), true),
        sc::BPF => one(FdKind::Bpf, format!("bpf cmd {}", a[0]), true),
        _ => one(FdKind::Other, sc::name(nr).unwrap_or("?").into(), false),
    }
}

fn fd_pair(aux: &[u8]) -> (i32, i32) {
    let word = |i: usize| {
        aux.get(i..i + 4)
            .map_or(-1, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    (word(0), word(4))
}

fn socket_name(family: u64, ty: u64, proto: u64) -> String {
    let family = match family {
        1 => "unix".to_string(),
        2 => "inet".to_string(),
        10 => "inet6".to_string(),
        16 => "netlink".to_string(),
        17 => "packet".to_string(),
        f => format!("family {f}"),
    };
    let ty = match ty & 0xf {
        1 => "stream".to_string(),
        2 => "dgram".to_string(),
        3 => "raw".to_string(),
        5 => "seqpacket".to_string(),
        t => format!("type {t}"),
    };
    if proto == 0 {
        format!("{family} {ty}")
    } else {
        format!("{family} {ty} proto {proto}")
    }
}

/// The [`Event::ExitTable`] of an exit record's (or stash's) bitmap of `bitmap.len()` bytes,
/// of a table of `max_fds` descriptors.
pub fn exit_table(pid: u32, ts: u64, max_fds: u64, bitmap: &[u8]) -> Event {
    // Bytes past the table's size, and trailing empty ones, say nothing.
    let covered = max_fds.min(bitmap.len() as u64 * 8);
    let mut open = bitmap[..(covered as usize).div_ceil(8)].to_vec();
    while open.last() == Some(&0) {
        open.pop();
    }
    Event::ExitTable {
        pid,
        ts,
        covered: covered as i32,
        open,
    }
}

/// Marks a connect abandoned against a listener of this host whose accept queue is full as
/// [`sc::ENDED_BACKLOG_FULL`]. The ring reader calls it as the record arrives, while the queue
/// is as the timeout left it: the tracer may reach the record seconds later, behind a first
/// symbolization. Decided once, in the record, so that a recording replays the same cause.
pub fn mark_backlog_full(rec: &mut Record, queues: &mut crate::listeners::PeerQueues) {
    let h = &mut rec.header;
    if h.kind == kind::UPSTREAM
        && h.args[sc::UPSTREAM_ENDED] == sc::ENDED_CONNECT_ABANDONED
        && !rec.aux.is_empty()
        && queues.full(h.tgid, &peer(&rec.aux))
    {
        h.args[sc::UPSTREAM_ENDED] = sc::ENDED_BACKLOG_FULL;
    }
}

/// A peer address from the sockaddr accept wrote.
fn peer(aux: &[u8]) -> String {
    let family = aux.get(0..2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match family {
        Some(2) if aux.len() >= 8 => format!(
            "{}:{}",
            Ipv4Addr::new(aux[4], aux[5], aux[6], aux[7]),
            port(aux)
        ),
        Some(10) if aux.len() >= 24 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&aux[8..24]);
            format!("[{}]:{}", Ipv6Addr::from(ip), port(aux))
        }
        Some(1) => {
            let path: Vec<u8> = aux[2..].iter().copied().take_while(|&c| c != 0).collect();
            if path.is_empty() {
                "unix peer".into()
            } else {
                format!("unix:{}", String::from_utf8_lossy(&path))
            }
        }
        _ => "accepted".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_placed_nowhere_are_one_location() {
        let nowhere = |addr| Frame {
            function: None,
            file: None,
            path: None,
            line: None,
            module: None,
            addr,
            offset: addr,
            lang: Lang::Native,
            inlined: false,
        };
        let raw = |addr| RawFrame {
            module: None,
            file_offset: addr,
            addr,
        };
        assert!(placed_nowhere(&raw(0x7f93_ee14_eb1d)));
        assert_eq!(
            Location::from(&nowhere(0x7f93_ee14_eb1d)),
            Location::from(&nowhere(0x7f7b_a65c_8b1d)),
            "ASLR moved it: the same nothing"
        );
        // JIT code: an offset in an anonymous mapping, which does tell frames apart.
        let jit = |offset| Frame {
            offset,
            ..nowhere(0x7f00_0000_0000 + offset)
        };
        assert!(!placed_nowhere(&RawFrame {
            file_offset: 0x10,
            ..raw(0x7f00_0000_0010)
        }));
        assert_ne!(Location::from(&jit(0x10)), Location::from(&jit(0x20)));
    }

    #[test]
    fn a_skipped_stack_is_named_as_such_not_after_its_syscall_wrapper() {
        // SAFETY: looking up a symbol of the C library this test links.
        let getpid = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
        let record = |skipped| Record {
            header: fdtrace_common::RecordHeader {
                tgid: std::process::id(),
                ..Default::default()
            },
            stack: Some(crate::decode::StackCapture {
                ip: getpid,
                skipped,
                ..Default::default()
            }),
            aux: bytes::Bytes::new(),
            py: Vec::new(),
        };
        let mut tracer = Tracer::new();
        let skipped = tracer.intern(&record(true));
        let unread = tracer.intern(&record(false));
        assert_ne!(
            skipped, unread,
            "a stack that could not be read was not skipped"
        );
        let frames = tracer.stacks.get(skipped);
        assert!(
            frames[0]
                .module
                .as_deref()
                .is_some_and(|m| m.starts_with("libc.so")),
            "{frames:?}"
        );
        assert_eq!(
            frames.last().unwrap().function.as_deref(),
            Some(SKIPPED_FRAME)
        );
        let reports: Vec<_> = frames
            .iter()
            .map(crate::report::FrameReport::from)
            .collect();
        assert_eq!(crate::report::place(&reports), SKIPPED_FRAME);
        assert_eq!(tracer.intern(&record(true)), skipped, "found again by ip");
        assert_eq!(
            tracer.stacks.get(unread).len(),
            1,
            "{:?}",
            tracer.stacks.get(unread)
        );
    }

    #[test]
    fn peers_format() {
        let mut v4 = vec![2, 0, 0x1f, 0x90, 127, 0, 0, 1];
        v4.extend([0; 8]);
        assert_eq!(peer(&v4), "127.0.0.1:8080");
        let mut v6 = vec![10, 0, 0, 80, 0, 0, 0, 0];
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        assert_eq!(peer(&v6), "[::1]:80");
        assert_eq!(peer(&[]), "accepted");
        assert_eq!(socket_name(2, 1 | 0x80000, 0), "inet stream");
    }

    #[test]
    fn pipes_create_two_descriptors() {
        let mut aux = 5i32.to_ne_bytes().to_vec();
        aux.extend(6i32.to_ne_bytes());
        let ev = create(1, 1, 0, sc::PIPE2, 0, &[0, O_CLOEXEC, 0, 0, 0, 0], &aux, 3);
        let Event::Opened { fds, .. } = ev else {
            panic!("{ev:?}")
        };
        let got: Vec<(i32, FdKind, bool)> = fds.iter().map(|f| (f.fd, f.kind, f.cloexec)).collect();
        assert_eq!(got, vec![(5, FdKind::Pipe, true), (6, FdKind::Pipe, true)]);
    }

    #[test]
    fn dups_name_their_source() {
        let ev = create(1, 1, 0, sc::DUP3, 9, &[4, 9, O_CLOEXEC, 0, 0, 0], &[], 3);
        assert!(
            matches!(
                ev,
                Event::Duplicated {
                    from: 4,
                    to: 9,
                    cloexec: true,
                    ..
                }
            ),
            "{ev:?}"
        );
        let ev = create(
            1,
            1,
            0,
            sc::FCNTL,
            10,
            &[4, sc::F_DUPFD_CLOEXEC, 0, 0, 0, 0],
            &[],
            3,
        );
        assert!(
            matches!(
                ev,
                Event::Duplicated {
                    from: 4,
                    to: 10,
                    cloexec: true,
                    ..
                }
            ),
            "{ev:?}"
        );
    }
}
