//! Wire types shared by fdtrace's kernel probes and its userspace.
//!
//! Everything that crosses the ring buffer is `#[repr(C)]`, fixed width and size-asserted, so
//! the kernel side and the decoder cannot disagree silently. Userspace decodes records field by
//! field from bytes (see `fdtrace::decode`); nothing is transmuted.
#![no_std]

pub mod syscalls;

/// Names of maps, programs and globals, shared so they are never spelled twice.
pub mod names {
    /// `HashMap<u32 tgid, Traced>`: the processes being traced. Checked first by every program.
    pub const MAP_TRACED: &str = "FDT_TRACED";
    /// The ring buffer all records go through.
    pub const MAP_EVENTS: &str = "FDT_EVENTS";
    /// `PerCpuArray<u64>` of [`crate::Counter`]s.
    pub const MAP_COUNTERS: &str = "FDT_COUNTERS";
    /// `PerCpuArray<StackedRecord>`: where a stack-bearing record with Python frames, or one
    /// too large for the ring's size classes, is assembled before output.
    pub const MAP_SCRATCH: &str = "FDT_SCRATCH";
    /// `HashMap<u32 tgid, PyProc>`: traced processes running CPython, and where to look.
    pub const MAP_PYTHON: &str = "FDT_PYTHON";
    /// Global `u32`: bytes of user stack to copy per stack-bearing record (0 turns capture off).
    pub const GLOBAL_STACK_BYTES: &str = "FDT_STACK_BYTES";
    /// Global `u32`: 1 to add forked children to the traced set, 0 to leave them untraced.
    pub const GLOBAL_FOLLOW: &str = "FDT_FOLLOW";
    /// Global `u64`: ring bytes waiting past which a record wakes the reader.
    pub const GLOBAL_WAKEUP_BYTES: &str = "FDT_WAKEUP_BYTES";
    /// Global [`crate::KernelLayout`]: tracepoint field and kernel struct offsets, read from
    /// the running kernel at load.
    pub const GLOBAL_LAYOUT: &str = "FDT_LAYOUT";
    /// Global `u32`: which selection maps the exec probe consults, a mask of [`crate::select`]
    /// bits (0: it adopts nothing).
    pub const GLOBAL_SELECT: &str = "FDT_SELECT";
    /// `HashMap<[u8; 16] comm, u8>`: a process that executes a program under one of these
    /// names (NUL-padded, as the kernel's comm) is adopted by the exec probe.
    pub const MAP_SELECT_COMMS: &str = "FDT_SEL_COMMS";
    /// `HashMap<u64 cgroup id, u8>`: a process that executes a program in one of these cgroup
    /// v2 directories or below one is adopted by the exec probe. A cgroup's id is its
    /// directory's inode number.
    pub const MAP_SELECT_CGROUPS: &str = "FDT_SEL_CGROUPS";

    /// BTF-typed tracepoint (`tp_btf`) on `sys_exit`: every descriptor change and every
    /// EMFILE/ENFILE, reading the caller's registers with plain loads.
    pub const PROG_SYS_EXIT: &str = "fdt_sys_exit";
    /// The same as a raw tracepoint, reading the registers with `bpf_probe_read_kernel`: for
    /// kernels whose verifier refuses the typed program (6.1: "reg type unsupported").
    pub const PROG_SYS_EXIT_RAW: &str = "fdt_sys_exit_raw";
    /// BTF-typed tracepoint on `sys_exit`, attached in place of [`PROG_SYS_EXIT`] when
    /// descriptors are kept: keeps creations at recognized call sites and their closes in
    /// the kernel, and tail-calls the main program (through [`MAP_SYS_EXIT_NEXT`]) for the
    /// rest.
    pub const PROG_KEEP: &str = "fdt_keep";
    /// The same as a raw tracepoint, in place of [`PROG_SYS_EXIT_RAW`].
    pub const PROG_KEEP_RAW: &str = "fdt_keep_raw";
    /// Program array of one slot: the `sys_exit` program [`PROG_KEEP`] tail-calls.
    pub const MAP_SYS_EXIT_NEXT: &str = "FDT_SYS_EXIT_NEXT";
    /// Raw tracepoint on `sys_enter`: the close of a kept descriptor, counted in the kernel
    /// while the descriptor is still open (no other thread can take its number then).
    pub const PROG_KEEP_CLOSE: &str = "fdt_keep_close";
    /// tracepoint `sched/sched_process_fork`: follows children in the kernel.
    pub const PROG_FORK: &str = "fdt_fork";
    /// tracepoint `sched/sched_process_exit`: a process's last thread leaves.
    pub const PROG_EXIT: &str = "fdt_exit";
    /// tracepoint `sched/sched_process_exec`: a process runs a new program.
    pub const PROG_EXEC: &str = "fdt_exec";
    /// tracepoint `sock/inet_sock_set_state`: how a traced process's outbound TCP
    /// connections end (a connect abandoned, a request never answered, a peer's early close
    /// or reset).
    pub const PROG_TCP_STATE: &str = "fdt_tcp_state";
    /// `LruHashMap<u64 struct sock, Outbound>`: outbound TCP connections of traced processes,
    /// from their connect to the end of their first exchange.
    pub const MAP_OUTBOUND: &str = "FDT_OUTBOUND";
    /// `LruHashMap<u32 tgid, ExitStash>`: the table at exit of a process whose exit record
    /// found the ring full, for userspace to take when it notices the process gone.
    pub const MAP_EXITS: &str = "FDT_EXITS";
    /// Global `u32`: 1 to keep creations whose call site the kernel recognizes in
    /// [`MAP_KEPT`] instead of sending them (see [`crate::Kept`]).
    pub const GLOBAL_KEEP: &str = "FDT_KEEP";
    /// `HashMap<MemoKey, Memo>`: call sites userspace unwound once, by the registers and the
    /// stack words that decide the unwind (see [`crate::Memo`]).
    pub const MAP_MEMOS: &str = "FDT_MEMOS";
    /// `HashMap<u64 tgid << 32 | fd, Kept>`: descriptors created at a recognized call site and
    /// not sent; a close that finds its entry sends nothing either.
    pub const MAP_KEPT: &str = "FDT_KEPT";
    /// `HashMap<PairKey, Pairs>`: per call site, the descriptors kept and closed in the
    /// kernel, with their lifetimes.
    pub const MAP_PAIRS: &str = "FDT_PAIRS";
    /// `HashMap<u32 tgid, u64 ts>`: processes whose kept descriptors created before `ts` must
    /// reach userspace before their closes do (a fork copied them, an EMFILE blames them, a
    /// /proc listing saw them): their closes are sent, and their entries stay until
    /// userspace takes them.
    pub const MAP_HOLDS: &str = "FDT_HOLDS";
}

/// Record kinds, the first field of every record.
pub mod kind {
    /// A syscall that changed descriptors without creating one (close, close_range, exec,
    /// F_SETFD, FIOCLEX): [`super::RecordHeader`] only.
    pub const SYSCALL: u32 = 1;
    /// A descriptor creation or an EMFILE/ENFILE failure: [`super::StackedRecord`], cut after
    /// `stack.stack_len` bytes of stack.
    pub const STACKED: u32 = 2;
    /// A traced process forked (threads are not reported): header, `args[0]` child pid,
    /// `args[1]` clone flags.
    pub const FORK: u32 = 3;
    /// A traced process's last thread exited. The header (`args[0]`: bytes of bitmap that
    /// follow, 0 when it could not be read; `args[1]`: the table's size in descriptors), then
    /// the bitmap of the descriptors still open at that instant ([`super::EXIT_FDS_MAX`] bytes
    /// of room): the table as it is, even when the ring lost some of the process's events.
    pub const EXIT: u32 = 4;
    /// A traced process executed a new program: laid out as a stacked record with no stack,
    /// the new `comm` in `args[0..2]` and the executable's path in `aux`.
    pub const EXEC: u32 = 5;
    /// A CPython code object a traced process ran, sent the first time the probe sees it
    /// (see [`super::CODE_COPIES`]): `args[0]` the code object's address, `args[1..4]` the
    /// addresses of its qualified name, file name and line table objects, `args[4]` and
    /// `args[5]` the bytes copied of each (low and high halves), then the copies. The process
    /// may be gone when userspace reads its records: this is what names its frames then.
    pub const CODE: u32 = 6;
    /// A traced process's outbound connection failed: a connect that returned an error, or a
    /// getsockopt(SO_ERROR) that told a non-blocking connect failed (nginx's way). An
    /// [`super::UpstreamRecord`]; the error number is in `args[5]`.
    pub const UPSTREAM: u32 = 7;
}

/// A [`kind::UPSTREAM`] record: the header, then the address tried as a `sockaddr`, `addr_len`
/// bytes of `addr` (0 when unknown). For connect, the caller's sockaddr; for getsockopt, the
/// socket's peer as the kernel holds it, laid out as `sockaddr_in` or `sockaddr_in6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamRecord {
    pub header: RecordHeader,
    pub addr_len: u32,
    pub pad: u32,
    /// A unix socket's path needs up to 110 bytes; 128 lets the probe bound reads with a mask.
    pub addr: [u8; UPSTREAM_ADDR_MAX],
}
pub const UPSTREAM_ADDR_MAX: usize = 128;
const _: () = assert!(size_of::<UpstreamRecord>() == 216);

/// Bytes of each copy in a [`kind::CODE`] record, in order: the code object's start (up to
/// its line table pointer in every version), its qualified name and its file name (`str`
/// objects), and its line table (a `bytes` object). Powers of two (see the probe's reads).
pub const CODE_COPIES: [usize; 4] = [256, 256, 512, 2048];
/// A [`kind::CODE`] record's size.
pub const CODE_RECORD: usize =
    size_of::<RecordHeader>() + CODE_COPIES[0] + CODE_COPIES[1] + CODE_COPIES[2] + CODE_COPIES[3];

/// Per-CPU counters the probes keep; userspace sums them across CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A record could not be reserved in the ring buffer: the event is lost.
    RingFull = 0,
    /// The user stack could not be read even after clamping to its page.
    StackReadFailed = 1,
    /// The stack copy was shortened to the end of sp's page because the full read failed.
    StackClamped = 2,
    /// A path, address or descriptor pair could not be read from user memory.
    AuxReadFailed = 3,
    /// A forked child could not be added to the full traced-process map: it is not followed.
    TracedFull = 4,
    /// A creation in a CPython process got no Python frames: the calling thread was not found
    /// in the interpreter's thread list, or its frame chain could not be read.
    PyFramesMissing = 5,
    /// A process matching the selection (`--comm`, `--cgroup`) executed a program but could
    /// not be added to the full traced-process map: it is not traced.
    NotAdopted = 6,
    /// A connection accepted at the limit was closed, and its socket had already been freed
    /// and reused by another connection when the close probe looked: whether it was answered
    /// is unknown, so it is not counted as closed unanswered.
    SocketReused = 7,
    /// A creation at a recognized call site was kept in the kernel rather than sent.
    Kept = 8,
    /// A creation at a recognized call site was sent after all: the kept-descriptor map was
    /// full, or its path or address was too long to keep.
    KeepFailed = 9,
    /// A kept descriptor was created and closed in the kernel: nothing was sent for either.
    PairClosed = 10,
    /// A creation went out without its stack (and Python frames) because the ring was more
    /// than half full: the event is kept, its descriptor has no frames.
    StackSkipped = 11,
}

/// Number of [`Counter`] slots.
pub const COUNTERS: u32 = 12;

/// Selecting processes by what they are rather than by pid (`--comm`, `--cgroup`): the exec
/// probe adopts an untraced process whose new program matches, so one that starts later is
/// traced from its first instruction.
pub mod select {
    /// Bit of `FDT_SELECT`: consult the comm map.
    pub const COMM: u32 = 1;
    /// Bit of `FDT_SELECT`: consult the cgroup map.
    pub const CGROUP: u32 = 2;
    /// Bytes of a comm, NUL included (the kernel's TASK_COMM_LEN): longer names are cut to 15.
    pub const COMM_LEN: usize = 16;
    /// Entries of each selection map.
    pub const MAX_ENTRIES: u32 = 256;
    /// Cgroup levels the probe looks up, from the root's children down: a process in a cgroup
    /// deeper than this is matched by its ancestors down to this level only. Container cgroups
    /// sit at 2 to 6 (kubepods.slice/kubepods-burstable.slice/...-pod.slice/cri-containerd-ID.scope).
    pub const CGROUP_LEVELS: u32 = 32;
}

/// Where the probes find what they read from tracepoint records and kernel structures, as
/// the running kernel lays them out: userspace reads it from tracefs format files and BTF at
/// load (`fdtrace::layout`), so nothing depends on one kernel's offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `child_pid` in `sched/sched_process_fork` (44 up to 6.12, 20 once the comms became
    /// `__data_loc` strings).
    pub fork_child_pid: u32,
    /// The `filename` `__data_loc` word in `sched/sched_process_exec`.
    pub exec_filename: u32,
    /// `group_dead` in `sched/sched_process_exit`, or [`NO_FIELD`] on kernels whose record
    /// lacks it (before 6.16); the probe then asks the task itself (the two offsets below).
    pub exit_group_dead: u32,
    /// `task_struct.signal`, from BTF.
    pub task_signal: u32,
    /// `signal_struct.live`, from BTF: the count of live threads, already decremented when
    /// `sched_process_exit` fires, so 0 means the last thread is leaving.
    pub signal_live: u32,
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds` and `fdtable.fd`, from BTF:
    /// the close probe looks at the slot it freed, to tell whether another thread's creation
    /// took the number before the close returned.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    /// `task_struct.mm`, `mm_struct.start_code` and `mm_struct.start_brk`, from BTF: at exec,
    /// a CPython registration whose `_PyRuntime` lies in the new executable's image is the new
    /// image's (userspace found it in the mapping report, which can beat the exec probe), and
    /// is kept; any other is the old image's and goes.
    pub task_mm: u32,
    pub mm_start_code: u32,
    pub mm_start_brk: u32,
    /// 1 to send the probes' own diagnostics (`--debug-probes`), 0 for none.
    pub debug: u32,
    /// `file.private_data` (a socket file's `struct socket`), `socket.sk`, `sock.sk_protocol`
    /// and `tcp_sock`'s `copied_seq` (read up to), `write_seq` (written up to) and `rcv_nxt`
    /// (received up to), from BTF: a connection accepted just after an EMFILE is looked at
    /// again at its close, to tell one closed unanswered. [`NO_FIELD`] in `tcp_copied_seq`
    /// when the kernel lacks any of them (the probe then skips the look).
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub sk_protocol: u32,
    pub tcp_copied_seq: u32,
    pub tcp_write_seq: u32,
    pub tcp_rcv_nxt: u32,
    /// `sock_common.skc_dport` (the peer's port): the same at the close as at the accept, or
    /// the sock was freed and reused by another connection in between. (Not the local port:
    /// the reset path's `inet_put_port` zeroes it.)
    pub sk_dport: u32,
    /// `sock.sk_ack_backlog` and `sock.sk_max_ack_backlog` (connections the kernel has
    /// accepted and the program not yet, and the listen backlog), `sock_common.skc_family`,
    /// `skc_rcv_saddr` and `skc_num` (the listening address), from BTF: an accept failing at
    /// the limit reports its listening socket's queue at that instant. [`NO_FIELD`] in
    /// `sk_ack_backlog` when the kernel lacks any of them.
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    pub sk_family: u32,
    pub sk_rcv_saddr: u32,
    pub sk_num: u32,
    /// `sock_common.skc_daddr` and `skc_v6_daddr` (with `sk_family` and `sk_dport`): the peer
    /// a failed non-blocking connect tried, read at getsockopt(SO_ERROR). [`NO_FIELD`] in
    /// `sk_daddr` when the kernel lacks one of them: those failures come without an address.
    pub sk_daddr: u32,
    pub sk_v6_daddr: u32,
    /// `sock.sk_err` and `tcp_sock`'s `bytes_sent` and `bytes_received`, from BTF, and the
    /// `skaddr`, `oldstate`, `newstate` and `protocol` fields of `sock/inet_sock_set_state`:
    /// how an outbound connection ended (see [`Outbound`]). [`NO_FIELD`] in
    /// `tcp_bytes_received` when the kernel lacks any of them (the state probe then does
    /// nothing, and only failed connects are reported).
    pub sk_err: u32,
    pub tcp_bytes_sent: u32,
    pub tcp_bytes_received: u32,
    pub state_skaddr: u32,
    pub state_oldstate: u32,
    pub state_newstate: u32,
    pub state_protocol: u32,
    /// `fdtable.open_fds`, from BTF: the exit probe copies the bitmap of a process's open
    /// descriptors into its [`kind::EXIT`] record.
    pub fdt_open_fds: u32,
}
const _: () = assert!(size_of::<KernelLayout>() == 140);

/// Bytes of open-descriptor bitmap an [`kind::EXIT`] record carries after its header: the
/// first 8192 descriptor numbers.
pub const EXIT_FDS_MAX: usize = 1024;

/// What an exit record would have said, kept in a map when the ring had no room for it: a
/// storm's exit is where the ring is most likely full.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExitStash {
    pub ts_ns: u64,
    /// Bytes of `open` read (0: none), and the table's size in descriptors.
    pub bytes: u64,
    pub max_fds: u64,
    pub open: [u8; EXIT_FDS_MAX],
}
const _: () = assert!(size_of::<ExitStash>() == 24 + EXIT_FDS_MAX);

/// An outbound TCP connection a traced process started with connect, kept by its `struct
/// sock` until its first exchange is over: the state probe tells, from the state it leaves
/// and the bytes it carried, a connect abandoned (SYNs unanswered), a request never answered,
/// or a peer that closed or reset before answering. Keyed by the sock rather than the
/// descriptor, so a `dup2` or a missed close cannot pair it with another connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outbound {
    /// When connect was called, and when the handshake completed (0 until then).
    pub connect_ns: u64,
    pub established_ns: u64,
    pub tgid: u32,
    pub fd: u32,
}
const _: () = assert!(size_of::<Outbound>() == 24);

/// How long after a process's EMFILE/ENFILE an accepted connection counts as accepted at the
/// limit: libuv's reserve-descriptor trick accepts within microseconds of the failure.
pub const AT_LIMIT_WINDOW_NS: u64 = 1_000_000_000;

/// What the accept probe keeps of a connection accepted at the limit, for its close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fresh {
    /// The `struct sock`, read again at the close (see the probe's `unanswered`).
    pub sock: u64,
    pub copied_seq: u32,
    pub write_seq: u32,
    pub peer_port: u16,
    pub pad16: u16,
    pub pad32: u32,
}

/// A [`KernelLayout`] field this kernel does not have.
pub const NO_FIELD: u32 = u32::MAX;

/// Value of the traced-process map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traced {
    /// Bounds of the main thread's stack, when userspace knows them (0, 0 otherwise): the
    /// mapping's start and the top of its frames, below argv and the environment. A copy from
    /// sp is clamped to `stack_hi`, which keeps it off both unmapped pages and the environment.
    pub stack_lo: u64,
    pub stack_hi: u64,
    /// When the process last failed with EMFILE/ENFILE (CLOCK_MONOTONIC ns; 0: never, or not
    /// since its exec or fork). Connections it accepts soon after are watched to their close,
    /// and closes of a process that never hit the limit cost nothing more.
    pub limit_hit_ns: u64,
}
const _: () = assert!(size_of::<Traced>() == 24);

/// The start of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// One of [`kind`].
    pub kind: u32,
    /// The x86_64 syscall number (0 for fork and exit records).
    pub nr: u32,
    pub tgid: u32,
    pub tid: u32,
    /// `bpf_ktime_get_ns`, i.e. CLOCK_MONOTONIC.
    pub ts_ns: u64,
    /// The syscall's return value.
    pub ret: i64,
    /// The syscall's arguments as the registers held them.
    pub args: [u64; 6],
}
const _: () = assert!(size_of::<RecordHeader>() == 80);

/// Registers and sizes for unwinding, after the header in a stacked record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackHeader {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes of stack copied from `sp`, following `aux`.
    pub stack_len: u32,
    /// Meaningful bytes of `aux`.
    pub aux_len: u32,
    /// Python frames in `py`, innermost first.
    pub py_count: u32,
    /// [`STACK_SKIPPED`] or 0.
    pub flags: u32,
}

/// [`StackHeader::flags`]: the probe skipped the stack copy under load; `stack_len` and
/// `py_count` are 0 whatever the stack size asked for.
pub const STACK_SKIPPED: u32 = 1;
const _: () = assert!(size_of::<StackHeader>() == 40);

/// Bytes for a path (opens), a socket address (accept) or a descriptor pair (pipe, socketpair).
pub const AUX_MAX: usize = 256;
/// The largest user stack copy a record can carry.
pub const STACK_MAX: usize = 16384;
/// The default stack copy: 4 KiB costs about 0.8 us per creation here (PLATFORM.md) and
/// covers the native frames of typical C, Rust and CPython call chains.
pub const STACK_DEFAULT: u32 = 4096;

/// Python frames copied per record: deeper ones are cut (a web handler sits within ~25 frames
/// of the event loop).
pub const PY_FRAMES_MAX: usize = 32;
/// Threads of one interpreter searched for the current one.
pub const PY_THREADS_MAX: usize = 64;

/// One CPython frame as the probe saw it: what userspace needs to name it later.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrame {
    /// Address of the frame's code object (8-aligned), its low 3 bits replaced by the low bits
    /// of the frame's owner byte (`is_entry` in 3.11, `owner` in 3.12+), which userspace
    /// interprets per version: entry frames (the first one a C call into the interpreter
    /// evaluates) are where native frames interleave.
    pub code: u64,
    /// The frame's instruction word as stored (`prev_instr`, `instr_ptr`, or `f_lasti` plus
    /// the next field in 3.10), for the line number.
    pub instr: u64,
}
const _: () = assert!(size_of::<PyFrame>() == 16);

/// Structure offsets of one CPython version, for the probe's frame walk (see
/// `fdtrace::python` for the table and where each number comes from).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyOffsets {
    pub runtime_interpreters_head: u32,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    /// `native_thread_id` (3.11+), or `thread_id` (3.10: a `pthread_t`, see `thread_tid`).
    pub tstate_thread_id: u32,
    /// When not 0, `tstate_thread_id` holds the address of the thread's C library thread
    /// descriptor and the kernel thread id is this many bytes into it (3.10, which does not
    /// record the kernel id).
    pub thread_tid: u32,
    /// `tstate->cframe` (3.11, 3.12); 0 where the thread state holds the frame itself.
    pub tstate_cframe: u32,
    /// `cframe->current_frame`, or the thread state's `current_frame` (3.13) or `frame`
    /// (3.10) when `tstate_cframe` is 0.
    pub current_frame: u32,
    /// `f_code`, `f_executable` (3.13).
    pub frame_code: u32,
    /// `previous`, `f_back` (3.10).
    pub frame_previous: u32,
    /// `prev_instr`, `instr_ptr` (3.13), `f_lasti` (3.10).
    pub frame_instr: u32,
    /// The byte copied into the code address's low bits: `is_entry` (3.11), `owner` (3.12+).
    pub frame_owner: u32,
    /// Keeps the size a multiple of 8, so `PyProc` has no hidden padding.
    pub pad: u32,
}
const _: () = assert!(size_of::<PyOffsets>() == 48);

/// Value of the Python map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProc {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    pub offsets: PyOffsets,
    /// The process's pid namespace (the nsfs device and inode of /proc/PID/ns/pid) when it is
    /// not the tracer's, else 0, 0. CPython records each thread's id as the thread sees it
    /// (`gettid()`), which inside a container is the namespace's number, not the host's.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
    /// Offsets in a code object of `co_qualname` (`co_name` in 3.10), `co_filename` and
    /// `co_linetable`, for the probe's copies (see [`kind::CODE`]).
    pub code_qualname: u16,
    pub code_filename: u16,
    pub code_linetable: u16,
    /// Told apart per registration, so that code objects announced by a process's earlier
    /// program (before an exec) or by an earlier process with its pid are announced again.
    pub generation: u16,
}
const _: () = assert!(size_of::<PyProc>() == 80);

/// Bytes of the Python frames section, present only when `py_count` is not 0.
pub const PY_BYTES: usize = PY_FRAMES_MAX * size_of::<PyFrame>();

/// A descriptor creation or failure with everything needed to unwind its user stack.
///
/// After `aux` comes the tail: the Python frames section (`PY_BYTES`, only in records of
/// CPython processes, `py_count` of its frames meaningful), then `stack_len` bytes of stack.
/// Only the used part goes out, so native programs do not pay for the Python section.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackedRecord {
    pub header: RecordHeader,
    pub stack: StackHeader,
    pub aux: [u8; AUX_MAX],
    pub tail: [u8; PY_BYTES + STACK_MAX],
}
/// Bytes before the tail in a stacked record.
pub const STACKED_FIXED: usize = size_of::<RecordHeader>() + size_of::<StackHeader>() + AUX_MAX;
const _: () = assert!(size_of::<StackedRecord>() == STACKED_FIXED + PY_BYTES + STACK_MAX);
const _: () = assert!(STACKED_FIXED == 376);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no padding (the size asserts above pin the layout).
    unsafe impl aya::Pod for super::Traced {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PyProc {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Outbound {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExitStash {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MemoKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Memo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Kept {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PairKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Pairs {}
}

/// Stack words a kernel memo compares: an unwind of 20 frames without frame pointers reads
/// about that many return addresses, and saved registers that decide a frame; nginx's open
/// of a static file needed 33 before the first requests showed which of them vary.
pub const MEMO_CHECKS: usize = 64;

/// Key of a kernel stack memo: the process and the registers of the capture (`sp` 0 when
/// stacks are off, where only `ip` locates the call).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemoKey {
    pub tgid: u32,
    pub pad: u32,
    pub ip: u64,
    pub sp: u64,
}
const _: () = assert!(size_of::<MemoKey>() == 24);

/// What userspace learned from unwinding one capture: the same registers and the same words
/// at these offsets from `sp` would unwind to call site `site` again, so the probe compares
/// them instead of sending the stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memo {
    /// The interned stack id userspace gave the unwind.
    pub site: u32,
    /// Bytes the capture held when the unwind found words past its end: the probe's copy
    /// must be as long, so that they are past this one's too. 0: any copy at least `reach`
    /// long.
    pub span: u32,
    /// Compared only when `bp_matters`: a function on the path keeps a frame pointer.
    pub bp: u64,
    pub bp_matters: u32,
    /// Checks in use, at most [`MEMO_CHECKS`].
    pub count: u32,
    /// Bytes from `sp` the checks cover (each offset + 8 at most this), at most `span`.
    pub reach: u32,
    pub pad: u32,
    /// Offsets from `sp`, 8-aligned, and the words expected there.
    pub offsets: [u32; MEMO_CHECKS],
    pub words: [u64; MEMO_CHECKS],
}
const _: () = assert!(size_of::<Memo>() == 32 + 12 * MEMO_CHECKS);

/// Bytes of path or peer address a kept descriptor holds: a longer address is sent instead,
/// a longer path cut.
pub const KEPT_AUX: usize = 64;

/// A descriptor created at a recognized call site and kept in the kernel: what its creation
/// record would have said, less the stack (`site` stands for it). Userspace turns it into
/// that record when it takes the entry (it aged, or its process forked, exited or failed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pub ts_ns: u64,
    /// The thread (pid_tgid) in whose `close` the descriptor is, between the close's entry
    /// and its return (0 otherwise): only that close's return removes the entry then.
    pub closing: u64,
    pub args: [u64; 6],
    pub tid: u32,
    pub nr: u32,
    pub site: u32,
    /// Bytes of `aux` read: a peer address, or a path's whole area (the path ends at its
    /// NUL; one of `KEPT_AUX` bytes or more is cut).
    pub aux_len: u32,
    pub aux: [u8; KEPT_AUX],
}
const _: () = assert!(size_of::<Kept>() == 80 + KEPT_AUX);

/// Key of a call site's kernel-side counts: the process, the stack id and the creating
/// syscall (which says the descriptor's kind).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub tgid: u32,
    pub site: u32,
    pub nr: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<PairKey>() == 16);

/// Lifetime buckets of [`Pairs`]: two per doubling of microseconds (see [`lifetime_bucket`]).
pub const LIFETIME_BUCKETS: usize = 48;

/// Descriptors of one call site created and closed in the kernel, never sent: how many, and
/// how long they lived. Only ever added to (userspace reads differences), so that the probe
/// adds into the entry without a lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pairs {
    pub count: u64,
    pub buckets: [u32; LIFETIME_BUCKETS],
}
const _: () = assert!(size_of::<Pairs>() == 8 + 4 * LIFETIME_BUCKETS);

/// The [`Pairs`] bucket of a lifetime: 0 and 1 us have their own, then two per doubling
/// (`[2^o, 1.5 * 2^o)` and `[1.5 * 2^o, 2^(o+1))`); the last also holds everything longer
/// (about 4.6 hours). Shifts only: BPF has no count-leading-zeros instruction.
#[inline(always)]
pub fn lifetime_bucket(micros: u64) -> usize {
    if micros < 2 {
        return micros as usize;
    }
    let mut v = micros;
    let mut octave = 0u32;
    for step in [32u32, 16, 8, 4, 2, 1] {
        if v >> step != 0 {
            v >>= step;
            octave += step;
        }
    }
    let half = ((micros >> (octave - 1)) & 1) as usize;
    let bucket = 2 * octave as usize + half;
    if bucket >= LIFETIME_BUCKETS {
        LIFETIME_BUCKETS - 1
    } else {
        bucket
    }
}

/// The middle of a [`lifetime_bucket`] in microseconds.
pub fn lifetime_bucket_middle(bucket: usize) -> u64 {
    if bucket < 2 {
        return bucket as u64;
    }
    let octave = (bucket / 2) as u32;
    let low = (1u64 << octave) + (bucket as u64 & 1) * (1u64 << (octave - 1));
    low + (1u64 << (octave - 1)) / 2
}
