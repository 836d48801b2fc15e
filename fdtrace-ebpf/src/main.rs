//! fdtrace's kernel probes.
//!
//! One program on the `sys_exit` tracepoint sees every syscall's result with the caller's
//! registers still in `pt_regs`, so it records every descriptor creation, every drop and every
//! EMFILE/ENFILE from any syscall; PLATFORM.md has the measurements behind that choice. It
//! comes in two builds, chosen at load: BTF-typed (`tp_btf`), which reads the registers with
//! plain loads (about 5% of a traced open/close loop went to `bpf_probe_read_kernel` calls),
//! and a raw tracepoint that reads them with that helper, for kernels whose verifier refuses
//! the typed one (Debian 12's 6.1). Sched tracepoints follow forks, execs and exits; the
//! offsets they read come from the running kernel (`FDT_LAYOUT`). Every program checks the
//! traced-process map first; the exec probe then adopts an untraced process whose new program
//! matches the selection maps (`--comm`, `--cgroup`).
#![no_std]
#![no_main]
// Atomic adds on map values (`kept`): the BPF target's core has no atomic types.
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand the context over by value"
)]

mod kept;
mod maps;
mod python;

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_task, bpf_get_current_task_btf,
            bpf_probe_read_kernel as read_kernel_raw, bpf_probe_read_kernel_str,
            bpf_probe_read_user as read_user_raw, bpf_probe_read_user_str, bpf_task_pt_regs,
        },
    },
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::{debug, warn};
use fdtrace_common::{
    AT_LIMIT_WINDOW_NS, AUX_MAX, Counter, EXIT_FDS_MAX, ExitStash, Fresh, KernelLayout, NO_FIELD,
    Outbound, PY_BYTES, RecordHeader, STACK_DEFAULT, STACK_MAX, STACK_SKIPPED, STACKED_FIXED,
    StackHeader, StackedRecord, Traced, UpstreamRecord, kind, select,
    syscalls::{self, Action, Aux},
};
use maps::{
    EXITS, FRESH, OUTBOUND, PYTHON, SCRATCH, SELECT_CGROUPS, SELECT_COMMS, TRACED, count,
    emit_header, emit_scratch,
};

/// Bytes of user stack to copy; set by userspace at load time (0 turns capture off).
#[unsafe(no_mangle)]
static FDT_STACK_BYTES: u32 = STACK_DEFAULT;

/// Whether forked children are traced; set by userspace at load time.
#[unsafe(no_mangle)]
static FDT_FOLLOW: u32 = 1;

/// Which selection maps the exec probe consults (`fdtrace_common::select` bits); set by
/// userspace at load time. 0 keeps an untraced process's exec down to the traced-map lookup.
#[unsafe(no_mangle)]
static FDT_SELECT: u32 = 0;

/// The running kernel's offsets, set by userspace at load time. The zeros here are never used:
/// userspace refuses to load when it cannot read a layout.
#[unsafe(no_mangle)]
static FDT_LAYOUT: KernelLayout = KernelLayout {
    fork_child_pid: 0,
    exec_filename: 0,
    exit_group_dead: NO_FIELD,
    task_signal: 0,
    signal_live: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    task_mm: 0,
    mm_start_code: 0,
    mm_start_brk: 0,
    debug: 0,
    file_private_data: 0,
    socket_sk: 0,
    sk_protocol: 0,
    tcp_copied_seq: NO_FIELD,
    tcp_write_seq: 0,
    tcp_rcv_nxt: 0,
    sk_dport: 0,
    sk_ack_backlog: NO_FIELD,
    sk_max_ack_backlog: 0,
    sk_family: 0,
    sk_rcv_saddr: 0,
    sk_num: 0,
    sk_daddr: NO_FIELD,
    sk_v6_daddr: 0,
    sk_err: 0,
    tcp_bytes_sent: 0,
    tcp_bytes_received: NO_FIELD,
    state_skaddr: 0,
    state_oldstate: 0,
    state_newstate: 0,
    state_protocol: 0,
    fdt_open_fds: 0,
};

/// One field of [`FDT_LAYOUT`], read volatile (the loader sets it after compilation); a
/// volatile read of the whole struct put all of it on the stack, which the deep `sys_exit`
/// path cannot afford.
macro_rules! layout {
    ($field:ident) => {{
        #[allow(
            unused_unsafe,
            reason = "also expanded inside unsafe blocks, where this one is redundant"
        )]
        // SAFETY: a global written only by the loader.
        let value = unsafe { core::ptr::read_volatile(&raw const FDT_LAYOUT.$field) };
        value
    }};
}

const CLONE_THREAD: u64 = 0x0001_0000;

#[inline(always)]
fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// The user registers a record needs, loaded from the kernel's `pt_regs`.
#[derive(Clone, Copy)]
struct Regs {
    ip: u64,
    sp: u64,
    bp: u64,
}

/// The syscall's arguments and the registers for unwinding.
#[derive(Clone, Copy)]
struct UserRegs {
    args: [u64; 6],
    regs: Regs,
}

/// One field of the tracepoint's `struct pt_regs *`: the verifier knows its BTF type and lets
/// the program load from it directly (a fault reads 0 instead of crashing).
macro_rules! reg {
    ($regs:expr, $field:ident) => {
        // SAFETY: a BTF-typed pointer argument, loaded within its struct.
        unsafe { core::ptr::read_volatile(&raw const (*$regs).$field) }
    };
}

#[btf_tracepoint(function = "sys_exit")]
pub fn fdt_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: *const pt_regs = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let nr = reg!(regs, orig_rax) as u32;
    match try_sys_exit(nr, ret, || Some(btf_user_regs(regs))) {
        Ok(()) | Err(()) => 0,
    }
}

/// The caller's arguments and registers, by plain loads from the BTF-typed `pt_regs`.
#[inline(always)]
fn btf_user_regs(regs: *const pt_regs) -> UserRegs {
    UserRegs {
        args: [
            reg!(regs, rdi),
            reg!(regs, rsi),
            reg!(regs, rdx),
            reg!(regs, r10),
            reg!(regs, r8),
            reg!(regs, r9),
        ],
        regs: Regs {
            ip: reg!(regs, rip),
            sp: reg!(regs, rsp),
            bp: reg!(regs, rbp),
        },
    }
}

/// Attached in place of `fdt_sys_exit` when descriptors are kept: keeps a creation at a
/// recognized call site, or the close of a kept descriptor, in the kernel (see `kept`), and
/// tail-calls `fdt_sys_exit` for whatever else concerns a traced process. A program of its
/// own: inside `fdt_sys_exit` its work took that program past the 512 bytes of stack 6.1
/// allows a call chain, while a tail call starts the next program on a fresh frame.
#[btf_tracepoint(function = "sys_exit")]
pub fn fdt_keep(ctx: BtfTracePointContext) -> i32 {
    let regs: *const pt_regs = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let nr = reg!(regs, orig_rax) as u32;
    if !kept::try_keep(nr, ret, || Some(btf_user_regs(regs))) {
        send_on(&ctx);
    }
    0
}

/// Hands the syscall to `fdt_sys_exit` (or its raw build: the loader puts the one it uses in
/// the slot). The tail call returns only when it failed, the slot being empty: the event is
/// then lost, and counted as such.
#[inline(always)]
fn send_on<C: EbpfContext>(ctx: &C) {
    // SAFETY: a context of the tracepoint the program in the slot was loaded for.
    unsafe { maps::SYS_EXIT_NEXT.tail_call(ctx, 0) };
    count(Counter::RingFull);
}

/// On `sys_enter`: the close of a kept descriptor (see `kept::close_entered`). A raw
/// tracepoint on every kernel: it reads one register.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn fdt_keep_close(ctx: RawTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    if id != i64::from(syscalls::CLOSE) {
        return 0;
    }
    let regs: *const pt_regs = ctx.arg(0);
    // SAFETY: a kernel pointer from the tracepoint; the helper checks the read.
    if let Ok(fd) = unsafe { bpf_probe_read_kernel(&raw const (*regs).rdi) } {
        kept::close_entered(fd);
    }
    0
}

/// The raw-tracepoint build of `fdt_keep`, for kernels on the raw `fdt_sys_exit`, which it
/// tail-calls.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn fdt_keep_raw(ctx: RawTracePointContext) -> i32 {
    let regs: *const pt_regs = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    // SAFETY: a kernel pointer from the tracepoint; the helper checks the read.
    let Ok(nr) = (unsafe { bpf_probe_read_kernel(&raw const (*regs).orig_rax) }) else {
        return 0;
    };
    if !kept::try_keep(nr as u32, ret, || raw_user_regs(regs)) {
        send_on(&ctx);
    }
    0
}

/// The raw-tracepoint build of `fdt_sys_exit`. `pt_regs` is the user register frame, whose
/// x86_64 layout is ABI (ptrace's `user_regs_struct`), so reading it by the bindings' layout
/// depends on no kernel version.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn fdt_sys_exit_raw(ctx: RawTracePointContext) -> i32 {
    let regs: *const pt_regs = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    // SAFETY: a kernel pointer from the tracepoint; the helper checks the read.
    let Ok(nr) = (unsafe { bpf_probe_read_kernel(&raw const (*regs).orig_rax) }) else {
        return 0;
    };
    match try_sys_exit(nr as u32, ret, || raw_user_regs(regs)) {
        Ok(()) | Err(()) => 0,
    }
}

/// The caller's arguments and registers, read with the checking helper from the raw
/// tracepoint's `pt_regs`. Field by field: a copy of the whole 168-byte frame on the stack
/// left too little of the program's 512 bytes for the Python code announcements.
#[inline(always)]
fn raw_user_regs(regs: *const pt_regs) -> Option<UserRegs> {
    // SAFETY: a kernel pointer from the tracepoint; the helper checks the read.
    let field = |f: *const u64| unsafe { bpf_probe_read_kernel(f) }.ok();
    // SAFETY: field addresses inside the frame the tracepoint points at (not dereferenced
    // here; the helper reads them).
    unsafe {
        Some(UserRegs {
            args: [
                field(&raw const (*regs).rdi)?,
                field(&raw const (*regs).rsi)?,
                field(&raw const (*regs).rdx)?,
                field(&raw const (*regs).r10)?,
                field(&raw const (*regs).r8)?,
                field(&raw const (*regs).r9)?,
            ],
            regs: Regs {
                ip: field(&raw const (*regs).rip)?,
                sp: field(&raw const (*regs).rsp)?,
                bp: field(&raw const (*regs).rbp)?,
            },
        })
    }
}

/// What both builds of the `sys_exit` program do: `load` reads the caller's registers, and is
/// only called for syscalls of traced processes that concern descriptors.
#[inline(always)]
fn try_sys_exit(nr: u32, ret: i64, load: impl FnOnce() -> Option<UserRegs>) -> Result<(), ()> {
    let failed = ret == -syscalls::EMFILE || ret == -syscalls::ENFILE;
    // Most syscalls on the machine (read, write, epoll_wait) concern no descriptor: the number
    // alone dismisses them, before the traced-set lookup, which every other process would
    // otherwise pay on every syscall.
    if !failed && syscalls::action(nr) == Action::Ignore {
        return Ok(());
    }
    let (tgid, tid) = current();
    // SAFETY: a lookup; the value is copied out at once.
    let Some(traced) = (unsafe { TRACED.get(tgid) }).copied() else {
        return Ok(());
    };
    let UserRegs { args, regs } = load().ok_or(())?;
    let header = RecordHeader {
        kind: kind::SYSCALL,
        nr,
        tgid,
        tid,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ret,
        args,
    };

    if failed {
        // Only an entry still there: the process may be exiting on another CPU.
        let mut hit = traced;
        hit.limit_hit_ns = header.ts_ns;
        let _ = TRACED.insert(tgid, hit, BPF_EXIST);
        let mut header = header;
        if nr == syscalls::ACCEPT4 || nr == syscalls::ACCEPT {
            header.args[syscalls::ACCEPT_QUEUE] = listen_queue(args[0]);
            header.args[syscalls::ACCEPT_LISTEN] = listen_address(args[0]);
        }
        let sent = emit_stacked(header, &regs, &traced, Aux::None);
        // The blame is the table at this instant: kept descriptors closed from now on are
        // sent, until userspace has taken the ones open now.
        kept::hold(tgid, header.ts_ns);
        return sent;
    }
    match syscalls::action(nr) {
        // Kept creations and closes never get here: `fdt_keep` took them.
        Action::Create(aux) if ret >= 0 => {
            let mut header = header;
            if nr == syscalls::OPENAT2 {
                // openat2's flags are in struct open_how (its first u64), not in a register.
                // SAFETY: a user pointer the kernel has just read the same struct through.
                header.args[4] = unsafe { bpf_probe_read_user(args[2] as *const u64) }.unwrap_or(0);
            }
            if (nr == syscalls::ACCEPT4 || nr == syscalls::ACCEPT)
                && at_limit(&traced, header.ts_ns)
            {
                watch(fresh_key(tgid, ret as u64));
            }
            emit_stacked(header, &regs, &traced, aux)
        }
        Action::Depends if ret >= 0 => match syscalls::depends(nr, &args) {
            Some(true) => emit_stacked(header, &regs, &traced, Aux::None),
            Some(false) if nr == syscalls::SETRLIMIT || nr == syscalls::PRLIMIT64 => {
                emit_limit(header)
            }
            Some(false) => emit_header(&header),
            None => Ok(()),
        },
        // close drops the descriptor whatever it returns, except when it was not open.
        Action::Change if nr == syscalls::CLOSE && ret != -syscalls::EBADF => {
            // Stamped (in the header) before the look: when the slot is seen empty, a creation
            // that takes the number later is stamped later too, and so applied after this
            // close. (Stamped after the look, a creation could fall between the look and the
            // stamp and be applied first: the kernel matrix's emulated 6.1 caught that.)
            let mut header = header;
            header.args[syscalls::CLOSE_REOPENED] = slot_taken(args[0]);
            // Only a process that hit the limit has connections to look at.
            header.args[syscalls::CLOSE_UNANSWERED] = if traced.limit_hit_ns == 0 {
                0
            } else {
                unanswered(tgid, args[0])
            };
            emit_header(&header)
        }
        Action::Change if nr != syscalls::CLOSE && ret == 0 => emit_header(&header),
        // A connect under way or made: how it ends is the state probe's to tell.
        Action::Upstream
            if nr == syscalls::CONNECT && (ret == 0 || ret == -syscalls::EINPROGRESS) =>
        {
            outbound(fresh_key(tgid, args[0]), header.ts_ns, ret == 0);
            Ok(())
        }
        Action::Upstream => upstream(&header),
        // Failed creations and changes, and syscalls that do neither.
        Action::Create(_) | Action::Depends | Action::Change | Action::Ignore => Ok(()),
    }
}

/// Whether a process that hit the limit did so within the window that makes an accept now an
/// accept at the limit (watched to its close).
#[inline(always)]
fn at_limit(traced: &Traced, ts: u64) -> bool {
    traced.limit_hit_ns != 0 && ts.wrapping_sub(traced.limit_hit_ns) <= AT_LIMIT_WINDOW_NS
}

/// 1 when descriptor `fd` of the current process is open again as its close returns: the
/// close freed the number inside the syscall, and another thread's creation took it and may
/// have reached sys_exit first. Userspace needs this to apply the two in the right order.
#[inline(always)]
fn slot_taken(fd: u64) -> u64 {
    open_file(fd).map_or(0, |file| u64::from(!file.is_null()))
}

/// The `struct file` in slot `fd` of the current process's table (null when empty). Offsets
/// from the running kernel's BTF; every pointer is read through the checking helper, each into
/// the one slot `p` (a slot per read took the close path past the stack limit).
#[inline(always)]
fn open_file(fd: u64) -> Result<*const u8, ()> {
    // SAFETY: no preconditions.
    let mut p = unsafe { bpf_get_current_task() };
    follow(&mut p, layout!(task_files))?;
    follow(&mut p, layout!(files_fdt))?;
    let fdt = p as *const u8;
    let mut max: u32 = 0;
    kernel_field_into(&mut max, fdt, layout!(fdt_max_fds))?;
    if fd >= u64::from(max) {
        return Ok(core::ptr::null());
    }
    kernel_field_into(&mut p, fdt, layout!(fdt_fd))?;
    follow(&mut p, (fd * 8) as u32)?;
    Ok(p as *const u8)
}

/// A connection accepted within [`AT_LIMIT_WINDOW_NS`] of its process's last EMFILE/ENFILE
/// is remembered with how far it had been read and written, for [`unanswered`] to compare at
/// its close. Only TCP: its sequence numbers say what the program read and wrote without
/// tracing every read and write (which would cost every process on the machine a lookup).
/// A function of its own (a BPF-to-BPF call) so that its locals get a frame of their own:
/// inlined, they pushed `sys_exit` past the 512-byte stack; and that frame must stay within
/// what `sys_exit`'s own leaves of the 512 bytes (96 at 416; the verifier rounds to 32).
///
/// `key` is [`fresh_key`]'s: one argument to keep across the helper calls, not two.
#[inline(never)]
fn watch(key: u64) {
    if layout!(tcp_copied_seq) == NO_FIELD {
        return;
    }
    let fd = key & 0xffff_ffff;
    // Written field by field through a raw pointer, never zeroed first: LLVM turns 16 bytes
    // of zero stores into a call to memset, a BPF-to-BPF call whose frame the verifier adds
    // to the chain (6.1 then counted 544 bytes of stack).
    let mut fresh = MaybeUninit::<Fresh>::uninit();
    let f = fresh.as_mut_ptr();
    let tcp = || -> Result<(), ()> {
        let p = sock_of(fd)?;
        let sock = p as *const u8;
        let mut protocol: u16 = 0;
        kernel_field_into(&mut protocol, sock, layout!(sk_protocol))?;
        if protocol != IPPROTO_TCP {
            return Err(());
        }
        // SAFETY: `f` points to `fresh`, which outlives this closure; its fields are integers,
        // written in place without a reference to the uninitialized whole.
        unsafe {
            (*f).sock = p;
            kernel_field_to(&raw mut (*f).copied_seq, sock, layout!(tcp_copied_seq))?;
            kernel_field_to(&raw mut (*f).write_seq, sock, layout!(tcp_write_seq))?;
            kernel_field_to(&raw mut (*f).peer_port, sock, layout!(sk_dport))?;
            (*f).pad16 = 0;
            (*f).pad32 = 0;
        }
        Ok(())
    };
    if tcp().is_ok() {
        // SAFETY: `tcp` wrote every field before returning Ok.
        let _ = FRESH.insert(key, unsafe { fresh.assume_init() }, 0);
    }
}

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The `struct sock` of socket descriptor `fd`, as a u64 (0 for none).
#[inline(always)]
fn sock_of(fd: u64) -> Result<u64, ()> {
    let mut p = open_file(fd)? as u64;
    if p == 0 {
        return Err(());
    }
    // file->private_data is the struct socket, socket->sk the struct sock.
    follow(&mut p, layout!(file_private_data))?;
    follow(&mut p, layout!(socket_sk))?;
    Ok(p)
}

/// A [`kind::UPSTREAM`] record when the connect or getsockopt `header` describes says an
/// outbound connection failed: a connect's error (a unix socket's EACCES, ENOENT, EAGAIN, a
/// blocking connect refused), or the error getsockopt(SO_ERROR) hands a proxy whose
/// non-blocking connect failed (nginx reads ECONNREFUSED there). Everything else (the
/// EINPROGRESS of every non-blocking connect, a getsockopt of anything else) costs a compare.
/// Its own BPF-to-BPF call, as [`watch`]: it writes straight into the ring reservation, so its
/// frame stays within what `sys_exit` leaves.
#[inline(never)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "the kernel aligns ring records to 8 bytes, as the header needs"
)]
fn upstream(header: &RecordHeader) -> Result<(), ()> {
    const ADDR_AT: usize = size_of::<RecordHeader>() + 8;
    let errno = if header.nr == syscalls::CONNECT {
        if !syscalls::upstream_errno(-header.ret) {
            return Ok(());
        }
        -header.ret
    } else {
        if header.ret != 0
            || header.args[1] != syscalls::SOL_SOCKET
            || header.args[2] != syscalls::SO_ERROR
        {
            return Ok(());
        }
        // SAFETY: the user int the kernel has just written the pending error through.
        let err = unsafe { bpf_probe_read_user(header.args[3] as *const i32) }.map_err(|_| ())?;
        if err <= 0 {
            return Ok(());
        }
        i64::from(err)
    };
    let Some(mut entry) = maps::reserve::<{ size_of::<UpstreamRecord>() }>() else {
        return Err(());
    };
    let dst = entry.as_mut_ptr();
    // SAFETY: the reservation holds an UpstreamRecord; the ring's records are 8-aligned.
    unsafe {
        // Word by word from the caller's header: a struct copy would take a frame of its own.
        let words = core::ptr::from_ref(header).cast::<u64>();
        for i in 0..size_of::<RecordHeader>() / 8 {
            dst.cast::<u64>().add(i).write(words.add(i).read());
        }
        let out = dst.cast::<RecordHeader>();
        (*out).kind = kind::UPSTREAM;
        // Volatile: two adjacent zero stores become a call to memset, a BPF-to-BPF call
        // whose frame 6.1's verifier adds to the chain (544 bytes, refused).
        let args = &raw mut (*out).args;
        args.cast::<u64>()
            .add(syscalls::UPSTREAM_DURATION)
            .write_volatile(0);
        args.cast::<u64>()
            .add(syscalls::UPSTREAM_ENDED)
            .write_volatile(syscalls::ENDED_FAILED);
        (*out).args[5] = errno as u64;
        let addr = dst.add(ADDR_AT);
        let len = if header.nr == syscalls::CONNECT {
            connect_address(addr, header.args[1], header.args[2])
        } else {
            peer_address(addr, header.args[0])
        };
        dst.add(size_of::<RecordHeader>())
            .cast::<[u32; 2]>()
            .write([len, 0]);
    }
    maps::submit(entry);
    Ok(())
}

/// Copies the sockaddr a connect was given (`len` bytes at user `addr`) to `dst`.
///
/// # Safety
/// `dst` has room for UPSTREAM_ADDR_MAX bytes.
#[inline(always)]
unsafe fn connect_address(dst: *mut u8, addr: u64, len: u64) -> u32 {
    // sockaddr_un is 110 bytes; the mask is a bound every verifier sees (127 < 128).
    let len = if len > 112 { 112 } else { len };
    // SAFETY: reading a local.
    let len = unsafe { core::ptr::read_volatile(&raw const len) } as u32 & 127;
    if addr == 0 || len == 0 {
        return 0;
    }
    // SAFETY: bounded by the record's address area; the helper checks the user pointer.
    if unsafe { read_user_raw(dst.cast(), len, addr as *const _) } == 0 {
        len
    } else {
        0
    }
}

/// Writes the peer of socket `fd` to `dst` (see [`sock_peer`]): a non-blocking connect's
/// address is gone from user memory by the time its outcome is read.
///
/// # Safety
/// As [`sock_peer`].
#[inline(always)]
unsafe fn peer_address(dst: *mut u8, fd: u64) -> u32 {
    if layout!(sk_daddr) == NO_FIELD {
        return 0;
    }
    match sock_of(fd) {
        // SAFETY: the caller's promise.
        Ok(sock) => unsafe { sock_peer(dst, sock as *const u8) },
        Err(()) => 0,
    }
}

/// Writes the peer of `sock` to `dst` as a `sockaddr_in` or `sockaddr_in6`, from the
/// kernel's sock; returns its length, 0 when unknown.
///
/// # Safety
/// `dst` has room for UPSTREAM_ADDR_MAX bytes, and is 8-aligned (a ring record's address area).
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "the address area starts 88 bytes into an 8-aligned ring record"
)]
unsafe fn sock_peer(dst: *mut u8, sock: *const u8) -> u32 {
    if layout!(sk_daddr) == NO_FIELD {
        return 0;
    }
    let mut family: u16 = 0;
    if kernel_field_into(&mut family, sock, layout!(sk_family)).is_err() {
        return 0;
    }
    let (addr, field, len) = match family {
        AF_INET => (4, layout!(sk_daddr), 16),
        AF_INET6 => (8, layout!(sk_v6_daddr), 28),
        _ => return 0,
    };
    // SAFETY: offsets inside the address area; the helper checks the kernel reads.
    let read = unsafe {
        dst.cast::<u16>().write(family);
        // skc_dport is in network order, as sin_port and sin6_port are.
        kernel_field_to(dst.add(2).cast::<u16>(), sock, layout!(sk_dport)).is_ok()
            && if family == AF_INET {
                kernel_field_to(dst.add(addr).cast::<u32>(), sock, field).is_ok()
            } else {
                kernel_field_to(dst.add(addr).cast::<[u8; 16]>(), sock, field).is_ok()
            }
    };
    if read { len } else { 0 }
}

/// Remembers a TCP connection that descriptor `key & 0xffff_ffff` of process `key >> 32`
/// started (`connected`: the connect completed at once), for the state probe. Its own
/// BPF-to-BPF call, as [`watch`].
#[inline(never)]
fn outbound(key: u64, ts: u64, connected: bool) {
    if layout!(tcp_bytes_received) == NO_FIELD {
        return;
    }
    let Ok(sock) = sock_of(key & 0xffff_ffff) else {
        return;
    };
    let mut protocol: u16 = 0;
    if kernel_field_into(&mut protocol, sock as *const u8, layout!(sk_protocol)).is_err()
        || protocol != IPPROTO_TCP
    {
        return;
    }
    let conn = Outbound {
        connect_ns: ts,
        established_ns: if connected { ts } else { 0 },
        tgid: (key >> 32) as u32,
        fd: key as u32,
    };
    let _ = OUTBOUND.insert(sock, conn, 0);
}

/// The [`syscalls::ACCEPT_QUEUE`] slot for an accept on `fd` that failed at the limit: the
/// connections waiting in its listen queue at this instant, which the program cannot take.
/// Its own BPF-to-BPF call, as [`watch`], to keep its locals off `sys_exit`'s frame.
#[inline(never)]
fn listen_queue(fd: u64) -> u64 {
    if layout!(sk_ack_backlog) == NO_FIELD {
        return 0;
    }
    let read = || -> Result<u64, ()> {
        let sock = sock_of(fd)? as *const u8;
        let mut queued: u32 = 0;
        let mut backlog: u32 = 0;
        kernel_field_into(&mut queued, sock, layout!(sk_ack_backlog))?;
        kernel_field_into(&mut backlog, sock, layout!(sk_max_ack_backlog))?;
        Ok(u64::from(queued) | (u64::from(backlog) << 32))
    };
    read().unwrap_or(0)
}

/// The [`syscalls::ACCEPT_LISTEN`] slot: where the listening socket `fd` listens.
#[inline(never)]
fn listen_address(fd: u64) -> u64 {
    if layout!(sk_ack_backlog) == NO_FIELD {
        return 0;
    }
    let read = || -> Result<u64, ()> {
        let sock = sock_of(fd)? as *const u8;
        let mut family: u16 = 0;
        let mut port: u16 = 0;
        kernel_field_into(&mut family, sock, layout!(sk_family))?;
        kernel_field_into(&mut port, sock, layout!(sk_num))?;
        match family {
            AF_INET => {
                let mut addr: u32 = 0;
                kernel_field_into(&mut addr, sock, layout!(sk_rcv_saddr))?;
                Ok(syscalls::LISTEN_IPV4 | (u64::from(addr) << 16) | u64::from(port))
            }
            AF_INET6 => Ok(syscalls::LISTEN_IPV6 | u64::from(port)),
            _ => Err(()),
        }
    };
    read().unwrap_or(0)
}

/// The close record's [`syscalls::CLOSE_UNANSWERED`] bits for descriptor `fd`: a connection
/// [`watch`] remembered, closed with nothing read or written since its accept.
/// Not inlined, for the same reason.
#[inline(never)]
fn unanswered(tgid: u32, fd: u64) -> u64 {
    let key = fresh_key(tgid, fd);
    // SAFETY: a lookup, copied out at once.
    let Some(fresh) = (unsafe { FRESH.get(key) }).copied() else {
        return 0;
    };
    let _ = FRESH.remove(key);
    // Since 6.7 close() drops the file's last reference itself, so tcp_close has run: its FIN
    // took one sequence number (write_seq + 1), or its reset none and freed the sock. TCP
    // socks are SLAB_TYPESAFE_BY_RCU, so the memory is still a tcp_sock, but the reset's own
    // softirq on loopback can hand it to the next connection at once: another peer port
    // then, and the answer is unknown (counted as such). Before 6.7 the last reference goes on the way
    // back to user space, after this tracepoint.
    let sock = fresh.sock as *const u8;
    let seqs = || -> Result<(u32, u32, u32, u16), ()> {
        Ok((
            kernel_field(sock, layout!(tcp_copied_seq))?,
            kernel_field(sock, layout!(tcp_write_seq))?,
            kernel_field(sock, layout!(tcp_rcv_nxt))?,
            kernel_field(sock, layout!(sk_dport))?,
        ))
    };
    let Ok((copied, written, received, peer_port)) = seqs() else {
        return 0;
    };
    if peer_port != fresh.peer_port {
        count(Counter::SocketReused);
        return 0;
    }
    if copied != fresh.copied_seq || written.wrapping_sub(fresh.write_seq) > 1 {
        return 0;
    }
    // More than the peer's FIN (one sequence number) unread: a request was waiting, and
    // closing on unread data resets the connection.
    if received.wrapping_sub(copied) > 1 {
        syscalls::UNANSWERED | syscalls::REQUEST_WAITING
    } else {
        syscalls::UNANSWERED
    }
}

#[inline(always)]
fn fresh_key(tgid: u32, fd: u64) -> u64 {
    (u64::from(tgid) << 32) | (fd & 0xffff_ffff)
}

/// The current process's executable image, text to the end of its bss (`mm->start_code` up to
/// `mm->start_brk`).
#[inline(always)]
fn executable_image() -> Result<(u64, u64), ()> {
    // SAFETY: no preconditions.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let mm: *const u8 = kernel_field(task, layout!(task_mm))?;
    Ok((
        kernel_field(mm, layout!(mm_start_code))?,
        kernel_field(mm, layout!(mm_start_brk))?,
    ))
}

/// Reads a `T` at `offset` bytes into a kernel object, through the checking helper (so an
/// unaligned or bad address is an error, not a fault).
#[inline(always)]
fn kernel_field<T>(base: *const u8, offset: u32) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel copies bytewise and checks the address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.map_err(|_| ())
}

/// Replaces the kernel pointer `p` by the pointer at `offset` bytes into what it points to.
#[inline(always)]
fn follow(p: &mut u64, offset: u32) -> Result<(), ()> {
    let base = *p as *const u8;
    kernel_field_into(p, base, offset)
}

/// [`kernel_field`] into `dst`, so that a chain of reads can share one stack slot.
#[inline(always)]
fn kernel_field_into<T>(dst: &mut T, base: *const u8, offset: u32) -> Result<(), ()> {
    // SAFETY: dst is a valid, exclusive place for a T.
    unsafe { kernel_field_to(core::ptr::from_mut(dst), base, offset) }
}

/// [`kernel_field_into`] for a place that may not be initialized yet.
///
/// # Safety
/// `dst` must be valid for writing a `T`.
#[inline(always)]
unsafe fn kernel_field_to<T>(dst: *mut T, base: *const u8, offset: u32) -> Result<(), ()> {
    // SAFETY: the helper writes size_of::<T>() bytes to dst, which the caller vouches for,
    // and checks the source address.
    let r = unsafe {
        read_kernel_raw(
            dst.cast(),
            size_of::<T>() as u32,
            base.wrapping_add(offset as usize).cast(),
        )
    };
    if r == 0 { Ok(()) } else { Err(()) }
}

/// A new RLIMIT_NOFILE, read from the caller's struct rlimit while it is still there.
#[inline(always)]
fn emit_limit(mut header: RecordHeader) -> Result<(), ()> {
    let ptr = if header.nr == syscalls::SETRLIMIT {
        header.args[1]
    } else {
        header.args[2]
    };
    // SAFETY: a user pointer the kernel has just read the same struct through.
    let limit = unsafe { bpf_probe_read_user(ptr as *const [u64; 2]) }.map_err(|_| ())?;
    header.args[4] = limit[0];
    header.args[5] = limit[1];
    emit_header(&header)
}

/// Outputs a record with the caller's stack: native processes write it straight into a ring
/// reservation of the next size up (see `emit_direct`); CPython processes, and stacks past
/// the default size, assemble it in the per-CPU scratch buffer first.
///
/// Under load (the ring more than half full, or no room for the stacked size) the record goes
/// out without its stack, flagged and counted, rather than being lost.
#[inline(always)]
fn emit_stacked(header: RecordHeader, regs: &Regs, traced: &Traced, aux: Aux) -> Result<(), ()> {
    let mut skip = maps::ring_over_half();
    let py = if skip {
        None
    } else {
        python::interpreter(header.tgid)
    };
    // Three sizes (stack room 512 B, 2 KiB, 4 KiB: powers of two, see `read_stack`), so that a
    // record wastes at most three quarters of its stack room: each is verified separately. The
    // stack length is computed apart on each path, so the verifier explores the scratch path
    // once rather than once per range of it (which had doubled the load).
    if py.is_none() && !skip {
        let want = stack_wanted(regs, traced);
        let sent = if want == 0 {
            // Capture off: the scratch path sends the exact 376 bytes, not a 1 KiB record.
            None
        } else if want <= 512 {
            Some(emit_direct::<{ STACKED_FIXED + 512 }>(
                &header, regs, aux, want,
            ))
        } else if want <= 2048 {
            Some(emit_direct::<{ STACKED_FIXED + 2048 }>(
                &header, regs, aux, want,
            ))
        } else if want as usize <= STACK_DEFAULT as usize {
            Some(emit_direct::<{ STACKED_FIXED + STACK_DEFAULT as usize }>(
                &header, regs, aux, want,
            ))
        } else {
            None
        };
        match sent {
            Some(Ok(())) => return Ok(()),
            // No room for the stack: try without.
            Some(Err(())) => skip = true,
            None => {}
        }
    }
    let rec = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: the scratch slot is this CPU's and programs do not nest on one CPU here.
    let rec: &mut StackedRecord = unsafe { &mut *rec };
    rec.header = header;
    rec.header.kind = kind::STACKED;
    // SAFETY: the aux array is AUX_MAX bytes.
    let aux_len = unsafe { read_aux(&header.args, rec.aux.as_mut_ptr(), aux) };
    if skip {
        rec.stack = stack_header(regs, 0, aux_len, 0);
        rec.stack.flags = STACK_SKIPPED;
        let sent = emit_scratch(rec, STACKED_FIXED);
        if sent.is_ok() {
            count(Counter::StackSkipped);
        }
        return sent;
    }
    let py_count = py.map_or(0, |py| python::frames(rec, py));
    if py.is_some() && py_count == 0 {
        count(Counter::PyFramesMissing);
    }

    let offset = if py_count == 0 { 0 } else { PY_BYTES };
    // SAFETY: offset <= PY_BYTES, and the stack is bounded by STACK_MAX: inside the tail.
    let dst = unsafe { rec.tail.as_mut_ptr().add(offset) };
    let want = stack_wanted(regs, traced);
    let stack_len = copy_stack(dst, STACK_MAX as u32, regs.sp, want);
    rec.stack = stack_header(regs, stack_len, aux_len, py_count);
    let sent = emit_scratch(rec, STACKED_FIXED + offset + stack_len);
    if let Some(py) = py
        && py_count > 0
    {
        python::announce_codes(rec, py_count, py);
    }
    sent
}

/// Writes a native stacked record of `C` bytes in place in the ring: header, registers, aux
/// and the stack read from user memory straight into it.
///
/// Assembling it in the per-CPU scratch buffer and outputting it from there copied it twice.
/// The record is larger than its content by up to half (userspace reads `stack_len`), which
/// the ring's 16 MiB absorbs.
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "the kernel aligns ring records to 8 bytes, as the header and registers need"
)]
fn emit_direct<const C: usize>(
    header: &RecordHeader,
    regs: &Regs,
    aux: Aux,
    want: u64,
) -> Result<(), ()> {
    const AUX_AT: usize = size_of::<RecordHeader>() + size_of::<StackHeader>();
    // A failure is not counted here: the caller sends the record without its stack.
    let Some(mut entry) = maps::reserve_or_fall_back::<C>() else {
        return Err(());
    };
    let dst = entry.as_mut_ptr();
    // SAFETY: C > STACKED_FIXED bytes: the header, the registers, the aux area, then the
    // stack bounded by C - STACKED_FIXED; the ring's records are 8-aligned.
    unsafe {
        dst.cast::<RecordHeader>().write(RecordHeader {
            kind: kind::STACKED,
            ..*header
        });
        let aux_len = read_aux(&header.args, dst.add(AUX_AT), aux);
        let stack_len = copy_stack(
            dst.add(STACKED_FIXED),
            (C - STACKED_FIXED) as u32,
            regs.sp,
            want,
        );
        dst.add(size_of::<RecordHeader>())
            .cast::<StackHeader>()
            .write(stack_header(regs, stack_len, aux_len, 0));
    }
    maps::submit(entry);
    Ok(())
}

#[inline(always)]
fn stack_header(regs: &Regs, stack_len: usize, aux_len: u32, py_count: u32) -> StackHeader {
    StackHeader {
        ip: regs.ip,
        sp: regs.sp,
        bp: regs.bp,
        stack_len: stack_len as u32,
        aux_len,
        py_count,
        flags: 0,
    }
}

/// Copies the extra facts of a creation to `dst`; returns how many bytes are meaningful.
///
/// # Safety
/// `dst` has room for AUX_MAX bytes.
#[inline(always)]
unsafe fn read_aux(args: &[u64; 6], dst: *mut u8, aux: Aux) -> u32 {
    let read = match aux {
        Aux::None => return 0,
        Aux::Path(n) => {
            let src = args[n & 3] as *const u8;
            // SAFETY: the helper checks the user pointer and bounds the copy by AUX_MAX.
            let r = unsafe { bpf_probe_read_user_str(dst.cast(), AUX_MAX as u32, src.cast()) };
            if r > 0 { Ok(r as u32 - 1) } else { Err(()) }
        }
        // SAFETY: as the caller promised.
        Aux::PeerAddr => unsafe { read_peer(dst, args[1], args[2]) },
        Aux::FdPair(n) => {
            // SAFETY: a user pointer the kernel just wrote two ints through.
            unsafe { bpf_probe_read_user(args[n & 3] as *const [i32; 2]) }
                .map(|pair| {
                    // SAFETY: 8 of the AUX_MAX bytes.
                    unsafe { dst.cast::<[u8; 8]>().write_unaligned(pair_bytes(pair)) };
                    8
                })
                .map_err(|_| ())
        }
    };
    read.unwrap_or_else(|()| {
        count(Counter::AuxReadFailed);
        0
    })
}

#[inline(always)]
fn pair_bytes(pair: [i32; 2]) -> [u8; 8] {
    let a = pair[0].to_ne_bytes();
    let b = pair[1].to_ne_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// The peer address accept wrote through `addr`, `*addrlen` bytes long (none when NULL).
///
/// # Safety
/// `dst` has room for AUX_MAX bytes.
#[inline(always)]
unsafe fn read_peer(dst: *mut u8, addr: u64, addrlen: u64) -> Result<u32, ()> {
    if addr == 0 || addrlen == 0 {
        return Ok(0);
    }
    // SAFETY: user pointers the kernel just wrote through.
    let len = unsafe { bpf_probe_read_user(addrlen as *const u32) }.map_err(|_| ())?;
    // sockaddr_in6 is 28 bytes; unix socket paths need up to 110.
    let len = if len as usize > 112 { 112 } else { len };
    if len == 0 {
        return Ok(0);
    }
    // As in `read_stack`: a bound the compiler keeps and every verifier sees (127 < AUX_MAX).
    // SAFETY: reading a local.
    let len = unsafe { core::ptr::read_volatile(&raw const len) } & 127;
    // SAFETY: bounded by the aux area.
    let r = unsafe { read_user_raw(dst.cast(), len, addr as *const _) };
    if r == 0 { Ok(len) } else { Err(()) }
}

/// How many bytes of stack to copy from sp: FDT_STACK_BYTES, clamped to the end of the main
/// thread's stack when userspace told us where it is (what lies above, argv and the
/// environment, helps no unwind).
#[inline(always)]
fn stack_wanted(regs: &Regs, traced: &Traced) -> u64 {
    // SAFETY: a global written only by the loader.
    let want = u64::from(unsafe { core::ptr::read_volatile(&raw const FDT_STACK_BYTES) });
    let sp = regs.sp;
    let mut len = if want > STACK_MAX as u64 {
        STACK_MAX as u64
    } else {
        want
    };
    if traced.stack_lo <= sp && sp < traced.stack_hi && traced.stack_hi - sp < len {
        len = traced.stack_hi - sp;
    }
    len
}

/// Copies `want` bytes (at most `cap`, a constant once inlined) of user stack from sp to
/// `dst`; returns the length.
///
/// bpf_probe_read_user fails whole if any page of the range is missing, so a failed copy is
/// retried up to the end of sp's page (thread stacks, whose bounds we do not know).
#[inline(always)]
fn copy_stack(dst: *mut u8, cap: u32, sp: u64, want: u64) -> usize {
    // Stacks off: nothing to read, and nothing unreadable to count.
    if want == 0 {
        return 0;
    }
    if read_stack(dst, cap, sp, want) {
        return want as usize;
    }
    let to_page_end = 4096 - (sp & 4095);
    if to_page_end < want && read_stack(dst, cap, sp, to_page_end) {
        count(Counter::StackClamped);
        return to_page_end as usize;
    }
    count(Counter::StackReadFailed);
    0
}

/// `cap` is a power of two.
#[inline(always)]
fn read_stack(dst: *mut u8, cap: u32, sp: u64, len: u64) -> bool {
    if len == 0 || len > u64::from(cap) {
        return false;
    }
    // The verifier must see len <= cap at the call. Older verifiers (6.1) lose the bound the
    // comparison above gives when the compiler keeps len in another register, and the
    // compiler drops a mask it can prove redundant: so the mask comes after a volatile reload
    // (opaque to the compiler; the verifier keeps a spilled scalar's bounds), and for
    // 1 <= len <= cap it changes nothing.
    // SAFETY: reading a local.
    let len = unsafe { core::ptr::read_volatile(&raw const len) };
    let len = ((len.wrapping_sub(1)) & u64::from(cap - 1)) + 1;
    // SAFETY: the caller's destination has room for cap bytes.
    unsafe { read_user_raw(dst.cast(), len as u32, sp as *const _) == 0 }
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn fdt_fork(ctx: TracePointContext) -> u32 {
    match try_fork(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

/// Runs in the parent during copy_process, before the child can run: the child is added to the
/// traced set here so not one of its syscalls is missed.
fn try_fork(ctx: &TracePointContext) -> Result<(), ()> {
    let (tgid, tid) = current();
    // SAFETY: a lookup; the value is copied out at once.
    let Some(traced) = (unsafe { TRACED.get(tgid) }).copied() else {
        return Ok(());
    };
    let offset = layout!(fork_child_pid) as usize;
    // SAFETY: a read inside the tracepoint record, at the offset its format file gave.
    let child: i32 = unsafe { ctx.read_at(offset) }.map_err(|_| ())?;
    let (nr, flags) = clone_flags();
    if child <= 0 {
        // A layout the loader misread: say so rather than trace pid 0.
        if layout!(debug) != 0 {
            warn!(
                ctx,
                "fork in {}: child pid read as {} at offset {}",
                tgid,
                child,
                layout!(fork_child_pid)
            );
        }
        return Err(());
    }
    // SAFETY: a global written only by the loader.
    let follow = unsafe { core::ptr::read_volatile(&raw const FDT_FOLLOW) };
    if flags & CLONE_THREAD != 0 || follow == 0 {
        return Ok(());
    }
    // The child's table is a copy, but the limit was hit by the parent, not by it.
    let child_traced = Traced {
        limit_hit_ns: 0,
        ..traced
    };
    if TRACED.insert(child as u32, child_traced, 0).is_err() {
        count(Counter::TracedFull);
        if layout!(debug) != 0 {
            warn!(
                ctx,
                "fork in {}: traced map full, child {} not followed", tgid, child
            );
        }
        return Err(());
    }
    if layout!(debug) != 0 {
        debug!(
            ctx,
            "fork in {}: child {} followed (syscall {})", tgid, child, nr
        );
    }
    // A forked CPython is the same interpreter at the same addresses.
    // SAFETY: a lookup; the value is copied out at once.
    if let Some(py) = unsafe { PYTHON.get(tgid) }.copied() {
        let _ = PYTHON.insert(child as u32, py, 0);
    }
    // SAFETY: no preconditions.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let sent = emit_header(&RecordHeader {
        kind: kind::FORK,
        nr,
        tgid,
        tid,
        ts_ns,
        ret: i64::from(child),
        args: [child as u64, flags, 0, 0, 0, 0],
    });
    // The child's table is a copy of the parent's, kept descriptors included. After the
    // record: a close the hold sends is then behind it in the ring (see `kept::hold`).
    kept::hold(tgid, ts_ns);
    sent
}

/// The syscall and clone flags of the fork in progress, from the parent's saved registers.
#[inline(always)]
fn clone_flags() -> (u32, u64) {
    // SAFETY: the helpers return the current task and its user registers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    // SAFETY: a kernel pointer from the helper above.
    let Ok(regs) = (unsafe { bpf_probe_read_kernel(regs) }) else {
        return (0, 0);
    };
    let nr = regs.orig_rax as u32;
    let flags = match nr {
        syscalls::CLONE => regs.rdi,
        // struct clone_args starts with the u64 flags.
        // SAFETY: a user pointer the kernel has just read.
        syscalls::CLONE3 => unsafe { bpf_probe_read_user(regs.rdi as *const u64) }.unwrap_or(0),
        _ => 0,
    };
    (nr, flags)
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn fdt_exec(ctx: TracePointContext) -> u32 {
    match try_exec(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

/// Runs after the point of no return of a successful execve, in the process itself: its
/// close-on-exec descriptors are gone. Carries the new comm and the executable's path, which
/// a short-lived process no longer has in /proc by the time userspace looks.
fn try_exec(ctx: &TracePointContext) -> Result<(), ()> {
    let (tgid, tid) = current();
    // SAFETY: a lookup.
    if unsafe { TRACED.get(tgid) }.is_none() && !adopt(ctx, tgid) {
        return Ok(());
    }
    let rec = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch slot.
    let rec: &mut StackedRecord = unsafe { &mut *rec };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&comm[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(b)
    };
    rec.header = RecordHeader {
        kind: kind::EXEC,
        nr: syscalls::EXECVE,
        tgid,
        tid,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ret: 0,
        args: [word(0), word(1), 0, 0, 0, 0],
    };
    let offset = layout!(exec_filename) as usize;
    // filename is a __data_loc word: the low 16 bits are the string's offset from the record
    // start, the high 16 its length.
    // SAFETY: a read inside the tracepoint record, where its format file put the word.
    let loc: u32 = unsafe { ctx.read_at(offset) }.map_err(|_| ())?;
    let src = (ctx.as_ptr() as usize + (loc & 0xffff) as usize) as *const u8;
    // SAFETY: the helper bounds the copy by AUX_MAX.
    let r = unsafe {
        bpf_probe_read_kernel_str(rec.aux.as_mut_ptr().cast(), AUX_MAX as u32, src.cast())
    };
    let aux_len = if r > 0 { r as u32 - 1 } else { 0 };
    rec.stack = StackHeader {
        ip: 0,
        sp: 0,
        bp: 0,
        stack_len: 0,
        aux_len,
        py_count: 0,
        flags: 0,
    };
    // The old image's interpreter is gone; userspace registers the new one's once it has
    // looked, unless it already has (the executable's mapping report can beat this probe).
    // SAFETY: a lookup; the value is copied out at once.
    if let Some(py) = unsafe { PYTHON.get(tgid) }.copied() {
        let image = executable_image();
        let keep = image.is_ok_and(|(start, end)| start <= py.runtime && py.runtime < end);
        if !keep {
            let _ = PYTHON.remove(tgid);
        }
        if layout!(debug) != 0 {
            let (start, end) = image.unwrap_or((0, 0));
            debug!(
                ctx,
                "exec of {}: interpreter runtime {:x}, image {:x}-{:x}, kept {}",
                tgid,
                py.runtime,
                start,
                end,
                u8::from(keep)
            );
        }
    }
    emit_scratch(rec, STACKED_FIXED)
}

/// Adds the current, untraced process to the traced set when the program it now runs matches
/// the selection (`--comm`, `--cgroup`); returns whether it is traced. The exec record that
/// follows tells userspace about it, which then reads its /proc as for `--pid`.
///
/// Deciding here rather than in userspace misses nothing between polls: the process is traced
/// from the first instruction of its new program, and its forks are followed from then on.
#[inline(always)]
fn adopt(ctx: &TracePointContext, tgid: u32) -> bool {
    const BPF_NOEXIST: u64 = 1;
    const EEXIST: i32 = 17;
    // SAFETY: a global written only by the loader.
    let select = unsafe { core::ptr::read_volatile(&raw const FDT_SELECT) };
    if select == 0 || !selected(select) {
        return false;
    }
    // Not overwriting: userspace may have just added it itself, with its stack's bounds.
    match TRACED.insert(tgid, Traced::default(), BPF_NOEXIST) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => return true,
        Err(_) => {
            count(Counter::NotAdopted);
            if layout!(debug) != 0 {
                warn!(
                    ctx,
                    "exec of {}: selected, but the traced map is full", tgid
                );
            }
            return false;
        }
    }
    if layout!(debug) != 0 {
        debug!(ctx, "exec of {}: selected, now traced", tgid);
    }
    true
}

/// Whether the current process matches the selection: its comm (already the new program's
/// at sched_process_exec) is selected, or its cgroup or one of that cgroup's ancestors is.
///
/// A process's cgroup is where it sits, often a leaf below the selected directory (a
/// container's init.scope, a service's sub-cgroup), so the ancestors are looked up one level
/// at a time: `bpf_get_current_ancestor_cgroup_id` is allowed in tracepoint programs since
/// 5.14 (kernel/trace/bpf_trace.c, bpf_tracing_func_proto) and answers 0 past the process's
/// own level. Registering every descendant directory in the map instead would miss a
/// directory created after fdtrace started (a new container's scope) until userspace polled.
#[inline(always)]
fn selected(select: u32) -> bool {
    if select & select::COMM != 0
        && let Ok(comm) = bpf_get_current_comm()
        // SAFETY: a lookup.
        && unsafe { SELECT_COMMS.get(comm) }.is_some()
    {
        return true;
    }
    if select & select::CGROUP != 0 {
        // Level 0 is the root, which userspace refuses to select.
        for level in 1..=select::CGROUP_LEVELS {
            // SAFETY: no preconditions.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id == 0 {
                break;
            }
            // SAFETY: a lookup.
            if unsafe { SELECT_CGROUPS.get(id) }.is_some() {
                return true;
            }
        }
    }
    false
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn fdt_exit(ctx: TracePointContext) -> u32 {
    match try_exit(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[expect(
    clippy::cast_ptr_alignment,
    reason = "the kernel aligns ring records to 8 bytes, as the header needs"
)]
fn try_exit(ctx: &TracePointContext) -> Result<(), ()> {
    let (tgid, tid) = current();
    // SAFETY: a lookup.
    if unsafe { TRACED.get(tgid) }.is_none() {
        return Ok(());
    }
    if !group_dead(ctx)? {
        return Ok(());
    }
    // Both maps forget the process here, in the kernel, before its pid can be reused.
    let _ = TRACED.remove(tgid);
    let _ = PYTHON.remove(tgid);
    let header = RecordHeader {
        kind: kind::EXIT,
        nr: 0,
        tgid,
        tid,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        ret: 0,
        args: [0; 6],
    };
    let Some(mut entry) =
        maps::reserve_or_fall_back::<{ size_of::<RecordHeader>() + EXIT_FDS_MAX }>()
    else {
        // Without room for the table, it waits in a map for userspace, and the exit alone
        // goes out (it may still fit).
        stash_exit(tgid, header.ts_ns);
        return emit_header(&header);
    };
    let dst = entry.as_mut_ptr();
    // SAFETY: the reservation holds the header and EXIT_FDS_MAX bytes after it; the ring's
    // records are 8-aligned.
    let (bytes, max) = unsafe {
        dst.cast::<RecordHeader>().write(header);
        open_fds(dst.add(size_of::<RecordHeader>()))
    };
    // SAFETY: as above; args[0] and args[1] inside the header just written.
    unsafe {
        let args = &raw mut (*dst.cast::<RecordHeader>()).args;
        args.cast::<u64>().write_volatile(bytes);
        args.cast::<u64>().add(1).write_volatile(max);
    }
    maps::submit(entry);
    Ok(())
}

/// Keeps the current process's table at exit in [`maps::EXITS`], assembled in the per-CPU
/// scratch buffer (a kilobyte does not fit on the stack).
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the kilobyte would be copied onto the stack"
)]
fn stash_exit(tgid: u32, ts_ns: u64) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // The scratch record is larger than a stash, and this CPU's alone while the probe runs.
    let stash = scratch.cast::<ExitStash>();
    // SAFETY: as above; the open array has EXIT_FDS_MAX bytes of room.
    unsafe {
        let (bytes, max) = open_fds((&raw mut (*stash).open).cast());
        (*stash).ts_ns = ts_ns;
        (*stash).bytes = bytes;
        (*stash).max_fds = max;
        let _ = EXITS.insert(tgid, &*stash, 0);
    }
}

/// Copies the current process's open-descriptor bitmap (`files->fdt->open_fds`, still whole
/// when `sched_process_exit` fires: do_exit closes the files after it) to `dst`; returns
/// the bytes copied (0 when unreadable) and the table's size in descriptors.
///
/// # Safety
/// `dst` has room for [`EXIT_FDS_MAX`] bytes.
#[inline(always)]
unsafe fn open_fds(dst: *mut u8) -> (u64, u64) {
    let read = || -> Result<(u64, u64), ()> {
        // SAFETY: no preconditions.
        let mut p = unsafe { bpf_get_current_task() };
        follow(&mut p, layout!(task_files))?;
        follow(&mut p, layout!(files_fdt))?;
        let fdt = p as *const u8;
        let max: u32 = kernel_field(fdt, layout!(fdt_max_fds))?;
        let bitmap: u64 = kernel_field(fdt, layout!(fdt_open_fds))?;
        // max_fds is a multiple of BITS_PER_LONG (at least 64); the mask is the verifier's
        // bound, EXIT_FDS_MAX a power of two.
        let bytes = (u64::from(max) / 8).clamp(8, EXIT_FDS_MAX as u64);
        // SAFETY: reading a local.
        let bytes = unsafe { core::ptr::read_volatile(&raw const bytes) };
        let bytes = ((bytes - 1) & (EXIT_FDS_MAX as u64 - 1)) + 1;
        // SAFETY: bytes <= EXIT_FDS_MAX, the caller's room; the helper checks the source.
        if unsafe { read_kernel_raw(dst.cast(), bytes as u32, bitmap as *const _) } != 0 {
            return Err(());
        }
        Ok((bytes, u64::from(max)))
    };
    read().unwrap_or((0, 0))
}

/// Whether the exiting thread is its process's last.
///
/// Kernels since 6.16 put `group_dead` in the record. Older ones do not, but do_exit has
/// already decremented `signal->live` when the tracepoint fires
/// (https://elixir.bootlin.com/linux/v6.1/source/kernel/exit.c#L805), so a count of 0 says
/// the same; its offsets come from BTF.
#[inline(always)]
fn group_dead(ctx: &TracePointContext) -> Result<bool, ()> {
    if layout!(exit_group_dead) != NO_FIELD {
        let offset = layout!(exit_group_dead) as usize;
        // SAFETY: a read inside the tracepoint record, where its format file put the field.
        let dead: u8 = unsafe { ctx.read_at(offset) }.map_err(|_| ())?;
        return Ok(dead != 0);
    }
    // SAFETY: no preconditions.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let signal: *const u8 = kernel_field(task, layout!(task_signal))?;
    let live: i32 = kernel_field(signal, layout!(signal_live))?;
    if layout!(debug) != 0 {
        let (tgid, tid) = current();
        debug!(
            ctx,
            "exit of {} thread {}: signal->live {}", tgid, tid, live
        );
    }
    Ok(live == 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Map update flag: only replace an entry still there (another CPU may have removed it).
const BPF_EXIST: u64 = 2;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn fdt_tcp_state(ctx: TracePointContext) -> u32 {
    match try_tcp_state(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

/// How an outbound connection of a traced process ended, told by the state it leaves and
/// the bytes it carried, read while the sock is certainly alive (inside the state change):
/// after close returns it may be freed. Runs for every TCP state change on the machine, in
/// softirq for the peer's FIN or reset; one map lookup dismisses the connections that are not
/// a traced process's outbound ones. Only the end of an exchange that went wrong is sent.
fn try_tcp_state(ctx: &TracePointContext) -> Result<(), ()> {
    // SAFETY (the `read_at`s): reads inside the tracepoint record, at offsets its format
    // file gave.
    let protocol: u16 = unsafe { ctx.read_at(layout!(state_protocol) as usize) }.map_err(|_| ())?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: as above.
    let sk: u64 = unsafe { ctx.read_at(layout!(state_skaddr) as usize) }.map_err(|_| ())?;
    // SAFETY: a lookup; the value is copied out at once.
    let Some(mut conn) = (unsafe { OUTBOUND.get(sk) }).copied() else {
        return Ok(());
    };
    // SAFETY: as above.
    let old: i32 = unsafe { ctx.read_at(layout!(state_oldstate) as usize) }.map_err(|_| ())?;
    // SAFETY: as above.
    let new: i32 = unsafe { ctx.read_at(layout!(state_newstate) as usize) }.map_err(|_| ())?;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let sock = sk as *const u8;
    let ended = match (old, new) {
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            conn.established_ns = now;
            let _ = OUTBOUND.insert(sk, conn, BPF_EXIST);
            return Ok(());
        }
        // A refused or unreachable connect sets sk_err before the state changes; the
        // process learns it from connect or getsockopt, whose records say it. Closed by
        // the process with no error: nothing answered the SYNs.
        (TCP_SYN_SENT, TCP_CLOSE) => {
            let err: i32 = kernel_field(sock, layout!(sk_err))?;
            (err == 0).then_some(syscalls::ENDED_CONNECT_ABANDONED)
        }
        (TCP_ESTABLISHED, _) => {
            let err: i32 = kernel_field(sock, layout!(sk_err))?;
            let mut received: u64 = kernel_field(sock, layout!(tcp_bytes_received))?;
            // The peer's FIN took a sequence number, which bytes_received counts.
            if new == TCP_CLOSE_WAIT {
                received = received.saturating_sub(1);
            }
            let sent: u64 = kernel_field(sock, layout!(tcp_bytes_sent))?;
            match new {
                _ if i64::from(err) == syscalls::ECONNRESET => Some(syscalls::ENDED_RESET),
                _ if received != 0 => None,
                TCP_CLOSE_WAIT => Some(syscalls::ENDED_CLOSED_EARLY),
                // The process closed it after sending a request, with nothing back: it gave
                // up waiting. Closed before sending anything, it was an idle connection (a
                // pool's), not a failure.
                TCP_FIN_WAIT1 | TCP_CLOSE if sent != 0 => Some(syscalls::ENDED_UNANSWERED),
                _ => None,
            }
        }
        _ => return Ok(()),
    };
    let _ = OUTBOUND.remove(sk);
    let Some(ended) = ended else {
        return Ok(());
    };
    let since = if ended == syscalls::ENDED_CONNECT_ABANDONED || conn.established_ns == 0 {
        conn.connect_ns
    } else {
        conn.established_ns
    };
    let errno = match ended {
        syscalls::ENDED_RESET => syscalls::ECONNRESET,
        syscalls::ENDED_CLOSED_EARLY => 0,
        // What nginx logs for both: "upstream timed out (110: Connection timed out)".
        _ => syscalls::ETIMEDOUT,
    };
    emit_ended(
        &RecordHeader {
            kind: kind::UPSTREAM,
            nr: syscalls::CONNECT,
            tgid: conn.tgid,
            tid: 0,
            ts_ns: now,
            ret: 0,
            args: [
                u64::from(conn.fd),
                0,
                0,
                now.wrapping_sub(since),
                ended,
                errno as u64,
            ],
        },
        sock,
    )
}

/// Outputs an [`UpstreamRecord`] with `header` and the peer of `sock`.
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "the kernel aligns ring records to 8 bytes, as the header needs"
)]
fn emit_ended(header: &RecordHeader, sock: *const u8) -> Result<(), ()> {
    let Some(mut entry) = maps::reserve::<{ size_of::<UpstreamRecord>() }>() else {
        return Err(());
    };
    let dst = entry.as_mut_ptr();
    // SAFETY: the reservation holds an UpstreamRecord; the ring's records are 8-aligned.
    unsafe {
        dst.cast::<RecordHeader>().write(*header);
        let len = sock_peer(dst.add(size_of::<RecordHeader>() + 8), sock);
        dst.add(size_of::<RecordHeader>())
            .cast::<[u32; 2]>()
            .write([len, 0]);
    }
    maps::submit(entry);
    Ok(())
}
