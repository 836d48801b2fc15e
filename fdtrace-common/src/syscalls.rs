//! x86_64 syscall numbers fdtrace dispatches on, and every syscall's name for reports.
//!
//! Generated from `asm/unistd_64.h` (plus the syscalls added since Debian 12's headers).

pub const READ: u32 = 0;
pub const OPEN: u32 = 2;
pub const CLOSE: u32 = 3;
/// The argument slot of a close record that the probe overwrites (close takes one argument):
/// 1 when another thread's creation had the number again by the time close returned.
pub const CLOSE_REOPENED: usize = 5;
/// Another slot of a close record: [`UNANSWERED`] when the descriptor was a TCP connection
/// accepted just after an EMFILE/ENFILE and closed without a byte read or written, plus
/// [`REQUEST_WAITING`] when the peer had sent data (its close then resets the connection).
pub const CLOSE_UNANSWERED: usize = 4;
pub const UNANSWERED: u64 = 1;
pub const REQUEST_WAITING: u64 = 2;
/// The slots of a failed accept/accept4 record that the probe overwrites (the syscall takes
/// four arguments): the listening socket's queue, `queued | backlog << 32`, and its address,
/// `LISTEN_IPV4 | ipv4 (network order) << 16 | port` or `LISTEN_IPV6 | port`; 0 when unknown.
pub const ACCEPT_QUEUE: usize = 4;
pub const ACCEPT_LISTEN: usize = 5;
pub const LISTEN_IPV4: u64 = 1 << 62;
pub const LISTEN_IPV6: u64 = 1 << 63;
/// The slots of a [`crate::kind::UPSTREAM`] record the probes fill: how the connection ended
/// (one of the `ENDED_*` values; [`ENDED_FAILED`] for a connect or getsockopt that returned
/// the error in `args[5]`), and for the state probe's records the nanoseconds it lasted (from
/// the connect for the connect phase, from the completed handshake for the response phase).
pub const UPSTREAM_DURATION: usize = 3;
pub const UPSTREAM_ENDED: usize = 4;
pub const ENDED_FAILED: u64 = 0;
/// The process closed a connect still waiting for its handshake (nothing answered the SYNs:
/// a full accept queue drops them).
pub const ENDED_CONNECT_ABANDONED: u64 = 1;
/// The process sent a request and closed the connection with nothing received: it gave up
/// waiting (nginx's `proxy_read_timeout`).
pub const ENDED_UNANSWERED: u64 = 2;
/// The peer closed the connection (FIN) before sending a byte.
pub const ENDED_CLOSED_EARLY: u64 = 3;
/// The peer reset the connection.
pub const ENDED_RESET: u64 = 4;
/// Set by userspace's ring reader, never by the probes: an [`ENDED_CONNECT_ABANDONED`] whose
/// peer, a listener on this host, had its accept queue full as the record arrived.
pub const ENDED_BACKLOG_FULL: u64 = 5;
pub const PIPE: u32 = 22;
pub const DUP: u32 = 32;
pub const DUP2: u32 = 33;
pub const SOCKET: u32 = 41;
pub const CONNECT: u32 = 42;
pub const GETSOCKOPT: u32 = 55;
/// getsockopt's level and option for the pending error of a socket.
pub const SOL_SOCKET: u64 = 1;
pub const SO_ERROR: u64 = 4;
pub const ACCEPT: u32 = 43;
pub const SOCKETPAIR: u32 = 53;
pub const CLONE: u32 = 56;
pub const FORK: u32 = 57;
pub const VFORK: u32 = 58;
pub const EXECVE: u32 = 59;
pub const FCNTL: u32 = 72;
pub const IOCTL: u32 = 16;
pub const CREAT: u32 = 85;
pub const EPOLL_CREATE: u32 = 213;
pub const TIMERFD_CREATE: u32 = 283;
pub const EVENTFD: u32 = 284;
pub const SIGNALFD: u32 = 282;
pub const SIGNALFD4: u32 = 289;
pub const EVENTFD2: u32 = 290;
pub const EPOLL_CREATE1: u32 = 291;
pub const DUP3: u32 = 292;
pub const PIPE2: u32 = 293;
pub const INOTIFY_INIT: u32 = 253;
pub const INOTIFY_INIT1: u32 = 294;
pub const FANOTIFY_INIT: u32 = 300;
pub const PERF_EVENT_OPEN: u32 = 298;
pub const ACCEPT4: u32 = 288;
pub const OPEN_BY_HANDLE_AT: u32 = 304;
pub const MEMFD_CREATE: u32 = 319;
pub const BPF: u32 = 321;
pub const EXECVEAT: u32 = 322;
pub const USERFAULTFD: u32 = 323;
pub const IO_URING_SETUP: u32 = 425;
pub const PIDFD_OPEN: u32 = 434;
pub const CLONE3: u32 = 435;
pub const CLOSE_RANGE: u32 = 436;
pub const OPENAT: u32 = 257;
pub const OPENAT2: u32 = 437;
pub const PIDFD_GETFD: u32 = 438;
pub const RECVMSG: u32 = 47;
pub const RECVMMSG: u32 = 299;
pub const EXIT: u32 = 60;
pub const EXIT_GROUP: u32 = 231;
pub const SETRLIMIT: u32 = 160;
pub const PRLIMIT64: u32 = 302;

/// Syscall names indexed by number; empty where x86_64 has no syscall.
pub const NAMES: [&str; 468] = [
    "read",
    "write",
    "open",
    "close",
    "stat",
    "fstat",
    "lstat",
    "poll",
    "lseek",
    "mmap",
    "mprotect",
    "munmap",
    "brk",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "ioctl",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "access",
    "pipe",
    "select",
    "sched_yield",
    "mremap",
    "msync",
    "mincore",
    "madvise",
    "shmget",
    "shmat",
    "shmctl",
    "dup",
    "dup2",
    "pause",
    "nanosleep",
    "getitimer",
    "alarm",
    "setitimer",
    "getpid",
    "sendfile",
    "socket",
    "connect",
    "accept",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "shutdown",
    "bind",
    "listen",
    "getsockname",
    "getpeername",
    "socketpair",
    "setsockopt",
    "getsockopt",
    "clone",
    "fork",
    "vfork",
    "execve",
    "exit",
    "wait4",
    "kill",
    "uname",
    "semget",
    "semop",
    "semctl",
    "shmdt",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "fcntl",
    "flock",
    "fsync",
    "fdatasync",
    "truncate",
    "ftruncate",
    "getdents",
    "getcwd",
    "chdir",
    "fchdir",
    "rename",
    "mkdir",
    "rmdir",
    "creat",
    "link",
    "unlink",
    "symlink",
    "readlink",
    "chmod",
    "fchmod",
    "chown",
    "fchown",
    "lchown",
    "umask",
    "gettimeofday",
    "getrlimit",
    "getrusage",
    "sysinfo",
    "times",
    "ptrace",
    "getuid",
    "syslog",
    "getgid",
    "setuid",
    "setgid",
    "geteuid",
    "getegid",
    "setpgid",
    "getppid",
    "getpgrp",
    "setsid",
    "setreuid",
    "setregid",
    "getgroups",
    "setgroups",
    "setresuid",
    "getresuid",
    "setresgid",
    "getresgid",
    "getpgid",
    "setfsuid",
    "setfsgid",
    "getsid",
    "capget",
    "capset",
    "rt_sigpending",
    "rt_sigtimedwait",
    "rt_sigqueueinfo",
    "rt_sigsuspend",
    "sigaltstack",
    "utime",
    "mknod",
    "uselib",
    "personality",
    "ustat",
    "statfs",
    "fstatfs",
    "sysfs",
    "getpriority",
    "setpriority",
    "sched_setparam",
    "sched_getparam",
    "sched_setscheduler",
    "sched_getscheduler",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_rr_get_interval",
    "mlock",
    "munlock",
    "mlockall",
    "munlockall",
    "vhangup",
    "modify_ldt",
    "pivot_root",
    "_sysctl",
    "prctl",
    "arch_prctl",
    "adjtimex",
    "setrlimit",
    "chroot",
    "sync",
    "acct",
    "settimeofday",
    "mount",
    "umount2",
    "swapon",
    "swapoff",
    "reboot",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "create_module",
    "init_module",
    "delete_module",
    "get_kernel_syms",
    "query_module",
    "quotactl",
    "nfsservctl",
    "getpmsg",
    "putpmsg",
    "afs_syscall",
    "tuxcall",
    "security",
    "gettid",
    "readahead",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "tkill",
    "time",
    "futex",
    "sched_setaffinity",
    "sched_getaffinity",
    "set_thread_area",
    "io_setup",
    "io_destroy",
    "io_getevents",
    "io_submit",
    "io_cancel",
    "get_thread_area",
    "lookup_dcookie",
    "epoll_create",
    "epoll_ctl_old",
    "epoll_wait_old",
    "remap_file_pages",
    "getdents64",
    "set_tid_address",
    "restart_syscall",
    "semtimedop",
    "fadvise64",
    "timer_create",
    "timer_settime",
    "timer_gettime",
    "timer_getoverrun",
    "timer_delete",
    "clock_settime",
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "exit_group",
    "epoll_wait",
    "epoll_ctl",
    "tgkill",
    "utimes",
    "vserver",
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    "kexec_load",
    "waitid",
    "add_key",
    "request_key",
    "keyctl",
    "ioprio_set",
    "ioprio_get",
    "inotify_init",
    "inotify_add_watch",
    "inotify_rm_watch",
    "migrate_pages",
    "openat",
    "mkdirat",
    "mknodat",
    "fchownat",
    "futimesat",
    "newfstatat",
    "unlinkat",
    "renameat",
    "linkat",
    "symlinkat",
    "readlinkat",
    "fchmodat",
    "faccessat",
    "pselect6",
    "ppoll",
    "unshare",
    "set_robust_list",
    "get_robust_list",
    "splice",
    "tee",
    "sync_file_range",
    "vmsplice",
    "move_pages",
    "utimensat",
    "epoll_pwait",
    "signalfd",
    "timerfd_create",
    "eventfd",
    "fallocate",
    "timerfd_settime",
    "timerfd_gettime",
    "accept4",
    "signalfd4",
    "eventfd2",
    "epoll_create1",
    "dup3",
    "pipe2",
    "inotify_init1",
    "preadv",
    "pwritev",
    "rt_tgsigqueueinfo",
    "perf_event_open",
    "recvmmsg",
    "fanotify_init",
    "fanotify_mark",
    "prlimit64",
    "name_to_handle_at",
    "open_by_handle_at",
    "clock_adjtime",
    "syncfs",
    "sendmmsg",
    "setns",
    "getcpu",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "finit_module",
    "sched_setattr",
    "sched_getattr",
    "renameat2",
    "seccomp",
    "getrandom",
    "memfd_create",
    "kexec_file_load",
    "bpf",
    "execveat",
    "userfaultfd",
    "membarrier",
    "mlock2",
    "copy_file_range",
    "preadv2",
    "pwritev2",
    "pkey_mprotect",
    "pkey_alloc",
    "pkey_free",
    "statx",
    "io_pgetevents",
    "rseq",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "",
    "pidfd_send_signal",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "pidfd_open",
    "clone3",
    "close_range",
    "openat2",
    "pidfd_getfd",
    "faccessat2",
    "process_madvise",
    "epoll_pwait2",
    "mount_setattr",
    "quotactl_fd",
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
    "memfd_secret",
    "process_mrelease",
    "futex_waitv",
    "set_mempolicy_home_node",
    "",
    "",
    "",
    "",
    "",
    "",
    "statmount",
    "listmount",
    "lsm_get_self_attr",
    "lsm_set_self_attr",
    "lsm_list_modules",
    "mseal",
    "setxattrat",
    "getxattrat",
    "listxattrat",
    "removexattrat",
    "open_tree_attr",
];

/// The name of syscall `nr`, if it has one.
pub fn name(nr: u32) -> Option<&'static str> {
    NAMES.get(nr as usize).copied().filter(|n| !n.is_empty())
}
/// Where a creating syscall's extra facts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aux {
    None,
    /// A NUL-terminated path pointed to by argument `n`.
    Path(usize),
    /// The peer address an accept wrote through argument 1 (length through argument 2).
    PeerAddr,
    /// An `int[2]` written through argument `n` (pipe, pipe2, socketpair).
    FdPair(usize),
}

/// What the probe does when syscall `nr` returns; failures with EMFILE/ENFILE are recorded
/// whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Ignore,
    /// Creates descriptors on success: a stacked record.
    Create(Aux),
    /// May create or only change descriptor flags, depending on its arguments (fcntl, ioctl, bpf).
    Depends,
    /// Drops descriptors (close, close_range): a header-only record. Exec has its own probe.
    Change,
    /// May tell that an outbound connection failed (connect, getsockopt): see
    /// [`upstream_errno`] and `kind::UPSTREAM`.
    Upstream,
}

/// How the probe treats syscall `nr`. For openat2 the probe also puts `open_how.flags` in
/// `args[4]`.
#[inline(always)]
pub fn action(nr: u32) -> Action {
    match nr {
        // memfd_create's "path" is the name it shows in /proc/PID/fd.
        OPEN | CREAT | MEMFD_CREATE => Action::Create(Aux::Path(0)),
        OPENAT | OPENAT2 => Action::Create(Aux::Path(1)),
        ACCEPT | ACCEPT4 => Action::Create(Aux::PeerAddr),
        PIPE | PIPE2 => Action::Create(Aux::FdPair(0)),
        SOCKETPAIR => Action::Create(Aux::FdPair(3)),
        SOCKET | DUP | DUP2 | DUP3 | EPOLL_CREATE | EPOLL_CREATE1 | EVENTFD | EVENTFD2
        | TIMERFD_CREATE | SIGNALFD | SIGNALFD4 | INOTIFY_INIT | INOTIFY_INIT1 | FANOTIFY_INIT
        | PIDFD_OPEN | PIDFD_GETFD | USERFAULTFD | PERF_EVENT_OPEN | IO_URING_SETUP
        | OPEN_BY_HANDLE_AT => Action::Create(Aux::None),
        FCNTL | IOCTL | BPF | SETRLIMIT | PRLIMIT64 => Action::Depends,
        CLOSE | CLOSE_RANGE => Action::Change,
        CONNECT | GETSOCKOPT => Action::Upstream,
        _ => Action::Ignore,
    }
}

/// fcntl commands fdtrace follows.
pub const F_DUPFD: u64 = 0;
pub const F_SETFD: u64 = 2;
pub const F_DUPFD_CLOEXEC: u64 = 1030;
pub const RLIMIT_NOFILE: u64 = 7;
/// ioctl requests that set or clear close-on-exec.
pub const FIONCLEX: u64 = 0x5450;
pub const FIOCLEX: u64 = 0x5451;

/// Whether `fcntl`, `ioctl` or `bpf` called with `args` created a descriptor (true), or the call
/// only changed close-on-exec or RLIMIT_NOFILE (false); `None` when it is irrelevant.
/// For limit changes the probe puts the new soft and hard limits in `args[4]` and `args[5]`.
#[inline(always)]
pub fn depends(nr: u32, args: &[u64; 6]) -> Option<bool> {
    match (nr, args[1], args[0]) {
        // bpf(2) commands that return a new descriptor: MAP_CREATE, PROG_LOAD, OBJ_GET,
        // PROG/MAP_GET_FD_BY_ID, RAW_TRACEPOINT_OPEN, BTF_LOAD, BTF_GET_FD_BY_ID, LINK_CREATE,
        // LINK_GET_FD_BY_ID, ENABLE_STATS, ITER_CREATE, TOKEN_CREATE (include/uapi/linux/bpf.h).
        (FCNTL, F_DUPFD | F_DUPFD_CLOEXEC, _)
        | (BPF, _, 0 | 5 | 7 | 13 | 14 | 17 | 18 | 19 | 28 | 30 | 32 | 33 | 36) => Some(true),
        (FCNTL, F_SETFD, _) | (IOCTL, FIOCLEX | FIONCLEX, _) | (SETRLIMIT, _, RLIMIT_NOFILE) => {
            Some(false)
        }
        // prlimit64(pid, resource, new, old): only a call that sets the limit matters.
        (PRLIMIT64, RLIMIT_NOFILE, _) if args[2] != 0 => Some(false),
        _ => None,
    }
}

/// Whether a connect that failed with `errno` (positive) is an upstream failure worth a
/// record: refused (nothing listens, TCP or unix), permission (a unix socket's mode or owner,
/// or a firewall's EPERM), no socket at a unix path, a unix socket's backlog full (EAGAIN),
/// and timeouts. Not EINPROGRESS (a non-blocking connect under way, whose outcome
/// getsockopt(SO_ERROR) tells), nor a caller's mistakes (EBADF, EINVAL, EISCONN).
#[inline(always)]
pub fn upstream_errno(errno: i64) -> bool {
    matches!(
        errno,
        ECONNREFUSED | EACCES | EPERM | ENOENT | EAGAIN | ETIMEDOUT | ENETUNREACH | EHOSTUNREACH
    )
}

pub const EPERM: i64 = 1;
pub const ENOENT: i64 = 2;
pub const EAGAIN: i64 = 11;
pub const EACCES: i64 = 13;
pub const ENETUNREACH: i64 = 101;
pub const ECONNRESET: i64 = 104;
pub const ETIMEDOUT: i64 = 110;
pub const ECONNREFUSED: i64 = 111;
pub const EHOSTUNREACH: i64 = 113;
pub const EMFILE: i64 = 24;
pub const ENFILE: i64 = 23;
pub const EBADF: i64 = 9;
pub const EINPROGRESS: i64 = 115;
