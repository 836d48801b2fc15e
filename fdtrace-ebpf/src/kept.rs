//! Descriptors kept in the kernel (issue 18): a creation at a call site userspace has already
//! unwound is recognized here, by the registers and the few stack words the unwind depended
//! on, and kept in `FDT_KEPT` instead of being sent with its stack. Its close adds to the
//! site's counts in `FDT_PAIRS` and sends nothing either, so a server's accept-answer-close
//! crosses no ring. Userspace takes the entries that stay open (after a second, or when a
//! fork, an exit, an EMFILE or a /proc listing needs the whole table) and turns each into the
//! creation record it stands for.
//!
//! Exactness rests on four rules:
//! - an entry is taken exactly once, by its close or by userspace (both delete it; only the
//!   one whose delete succeeds counts it);
//! - a close marks its entry at `sys_enter`, while the descriptor is still open, and only
//!   that close removes a marked entry, at its `sys_exit` (no creation can have put its own
//!   entry at the number in between, as the mark keeps them out);
//! - a creation of number N proves that an unmarked entry at N is dead (dup2's implicit
//!   close, close_range, exec): the creation counts it as a pair;
//! - while a hold (`FDT_HOLDS`) covers an entry, its close is sent and the entry left for
//!   userspace, which needs it in the table it is about to copy, blame or compare.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
    generated::{bpf_probe_read_user as read_user_raw, bpf_probe_read_user_str},
};
use fdtrace_common::{
    Counter, KEPT_AUX, Kept, LIFETIME_BUCKETS, MEMO_CHECKS, Memo, MemoKey, PairKey, Pairs,
    RecordHeader, STACK_MAX, lifetime_bucket,
    syscalls::{self, Action, Aux},
};

use crate::{
    Regs, UserRegs,
    maps::{HOLDS, KEEPING, KEPT, MEMO_WORDS, MEMOS, PAIRS, TRACED, count},
};

/// 1 to keep creations at recognized call sites; set by userspace at load time (0 while
/// recording, which needs every descriptor's lifetime).
#[unsafe(no_mangle)]
static FDT_KEEP: u32 = 0;

const BPF_NOEXIST: u64 = 1;

/// A new call site's counts, inserted before the first add.
static NO_PAIRS: Pairs = Pairs {
    count: 0,
    buckets: [0; LIFETIME_BUCKETS],
};

#[inline(always)]
pub fn enabled() -> bool {
    // SAFETY: a global written only by the loader.
    unsafe { core::ptr::read_volatile(&raw const FDT_KEEP) != 0 }
}

/// What `fdt_keep` does with a syscall's return: keeps a creation at a recognized call site,
/// counts the close of a kept descriptor, or forgets the dead entries at a creation's numbers.
/// True when that is all there is to do: the syscall was kept, counted, or concerns no
/// traced descriptor; false hands it to `fdt_sys_exit`.
#[inline(always)]
pub fn try_keep(nr: u32, ret: i64, load: impl FnOnce() -> Option<UserRegs>) -> bool {
    let action = syscalls::action(nr);
    let failed = ret == -syscalls::EMFILE || ret == -syscalls::ENFILE;
    // The same dismissals `fdt_sys_exit` makes first, so that the machine's other syscalls
    // end here.
    if !failed && action == Action::Ignore {
        return true;
    }
    let thread = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((thread >> 32) as u32, thread as u32);
    // SAFETY: a lookup; the value is copied out at once.
    let Some(traced) = (unsafe { TRACED.get(tgid) }).copied() else {
        return true;
    };
    let closing = nr == syscalls::CLOSE && ret != -syscalls::EBADF;
    let creating = ret >= 0 && matches!(action, Action::Create(_) | Action::Depends);
    if failed || !(closing || creating) || !enabled() {
        return false;
    }
    let Some(UserRegs { mut args, regs }) = load() else {
        // Whatever happens, a creation leaves no dead entry at its number behind it: one
        // left there by this thread could pass for this creation's kept entry.
        if creating {
            forget_stale(tgid, ret as u64, bpf_ktime_get_ns_now());
        }
        return false;
    };
    let ts = bpf_ktime_get_ns_now();
    if closing {
        return close_returned(thread, args[0], ts);
    }
    let Action::Create(aux) = action else {
        if syscalls::depends(nr, &args) == Some(true) {
            forget_stale(tgid, ret as u64, ts);
        }
        return false;
    };
    if let Aux::FdPair(n) = aux {
        // SAFETY: a user pointer the kernel just wrote two ints through.
        if let Ok(pair) = unsafe { bpf_probe_read_user(args[n & 3] as *const [i32; 2]) } {
            forget_stale(tgid, pair[0] as u64, ts);
            forget_stale(tgid, pair[1] as u64, ts);
        }
        return false;
    }
    let accept = nr == syscalls::ACCEPT4 || nr == syscalls::ACCEPT;
    if !keepable(nr)
        // Accepted at the limit: watched to its close by `fdt_sys_exit`.
        || (accept && crate::at_limit(&traced, ts))
    {
        forget_stale(tgid, ret as u64, ts);
        return false;
    }
    if nr == syscalls::OPENAT2 {
        // As `fdt_sys_exit` does: openat2's flags are in struct open_how (its first u64).
        // SAFETY: a user pointer the kernel has just read the same struct through.
        args[4] = unsafe { bpf_probe_read_user(args[2] as *const u64) }.unwrap_or(0);
    }
    let header = RecordHeader {
        kind: 0,
        nr,
        tgid,
        tid,
        ts_ns: ts,
        ret,
        args,
    };
    if keep(&header, &regs, crate::stack_wanted(&regs, &traced), aux) {
        return true;
    }
    // Sent: the dead entry at its number, if any, goes (kept, it went in `keep`).
    forget_stale(tgid, ret as u64, ts);
    false
}

#[inline(always)]
fn key(tgid: u32, fd: u64) -> u64 {
    (u64::from(tgid) << 32) | (fd & 0xffff_ffff)
}

#[inline(always)]
fn bpf_ktime_get_ns_now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether syscall `nr` creates one descriptor at the lowest free number, described by its
/// arguments and `aux` alone: those can be kept. A pair (pipe, socketpair) or a chosen number
/// (dup2, F_DUPFD) is always sent.
#[inline(always)]
fn keepable(nr: u32) -> bool {
    matches!(
        nr,
        syscalls::OPEN
            | syscalls::OPENAT
            | syscalls::OPENAT2
            | syscalls::CREAT
            | syscalls::SOCKET
            | syscalls::ACCEPT
            | syscalls::ACCEPT4
            | syscalls::EVENTFD
            | syscalls::EVENTFD2
            | syscalls::EPOLL_CREATE
            | syscalls::EPOLL_CREATE1
            | syscalls::TIMERFD_CREATE
    )
}

/// Descriptor `fd` of `tgid` was just created: an entry still at its number is dead (see the
/// module's rules), unless a hold needs it, in which case false says the creation must be
/// sent (it cannot be kept over the entry).
#[inline(always)]
fn forget_stale(tgid: u32, fd: u64, ts: u64) -> bool {
    let key = key(tgid, fd);
    // SAFETY: a lookup; the fields are copied out at once.
    let Some(old) = (unsafe { KEPT.get(key) }).map(|k| (k.ts_ns, k.site, k.nr, k.closing)) else {
        return true;
    };
    // A close in progress removes its own entry at its return.
    if old.3 != 0 || held(tgid, old.0) {
        return false;
    }
    if KEPT.remove(key).is_ok() {
        pair(tgid, old.1, old.2, ts.wrapping_sub(old.0));
    }
    true
}

/// Keeps the creation `header` describes if a memo recognizes its stack (copied `want` bytes
/// long from `regs.sp`; sp 0 in the memo's key when `want` is 0); false when it must be sent.
/// Assembled in per-CPU memory: a `Kept` is too large for the stack.
#[inline(always)]
fn keep(header: &RecordHeader, regs: &Regs, want: u64, aux: Aux) -> bool {
    let Some(slot) = KEEPING.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; programs do not nest on one CPU here.
    let k = unsafe { &mut *slot };
    k.memo_key = MemoKey {
        tgid: header.tgid,
        pad: 0,
        ip: regs.ip,
        sp: if want == 0 { 0 } else { regs.sp },
    };
    // SAFETY: the entry is only read, field by field, while this program runs.
    let Some(memo) = (unsafe { MEMOS.get(k.memo_key) }) else {
        return false;
    };
    let span_differs = if memo.span == 0 {
        u64::from(memo.reach) > want
    } else {
        u64::from(memo.span) != want
    };
    if span_differs || (memo.bp_matters != 0 && memo.bp != regs.bp) {
        return false;
    }
    // Native memos in a CPython process (made before its interpreter was found) would lose
    // the Python frames: its creations are sent. Looked up only on a hit, which is rare there.
    if !words_match(memo, regs.sp) || crate::python::interpreter(header.tgid).is_some() {
        return false;
    }
    k.kept.site = memo.site;
    k.kept.ts_ns = header.ts_ns;
    k.kept.closing = 0;
    k.kept.args = header.args;
    k.kept.tid = header.tid;
    k.kept.nr = header.nr;
    let Some(aux_len) = read_aux(&header.args, &mut k.kept.aux, aux) else {
        count(Counter::KeepFailed);
        return false;
    };
    k.kept.aux_len = aux_len;
    k.fd_key = key(header.tgid, header.ret as u64);
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, the 136-byte entry would be copied onto the stack first"
    )]
    let mut inserted = KEPT.insert(k.fd_key, &k.kept, BPF_NOEXIST);
    // An entry at the number is a dead one (see the module's rules): forgotten, unless a hold
    // needs it. Tried after the insert, as it is rare: a lookup first cost every creation.
    #[expect(clippy::needless_borrows_for_generic_args, reason = "as above")]
    if inserted.is_err() && forget_stale(header.tgid, header.ret as u64, header.ts_ns) {
        inserted = KEPT.insert(k.fd_key, &k.kept, BPF_NOEXIST);
    }
    if inserted.is_err() {
        count(Counter::KeepFailed);
        return false;
    }
    count(Counter::Kept);
    true
}

/// Whether the memo's words are at their offsets from `sp` now.
#[inline(always)]
fn words_match(memo: &Memo, sp: u64) -> bool {
    const WORDS: usize = STACK_MAX / 8;
    let reach = u64::from(memo.reach);
    if reach == 0 {
        return memo.count == 0;
    }
    let Some(buf) = MEMO_WORDS.get_ptr_mut(0) else {
        return false;
    };
    // As in the stack copy: a bound every verifier sees, after a reload the compiler cannot
    // see through (for 1 <= reach <= STACK_MAX the mask changes nothing).
    // SAFETY: reading a local.
    let reach = unsafe { core::ptr::read_volatile(&raw const reach) };
    if reach > STACK_MAX as u64 {
        return false;
    }
    let len = ((reach.wrapping_sub(1)) & (STACK_MAX as u64 - 1)) + 1;
    // SAFETY: the per-CPU buffer holds STACK_MAX bytes.
    if unsafe { read_user_raw(buf.cast(), len as u32, sp as *const _) } != 0 {
        return false;
    }
    // SAFETY: this CPU's buffer, just written.
    let words: &[u64; WORDS] = unsafe { &*buf };
    let n = memo.count as usize;
    for i in 0..MEMO_CHECKS {
        if i >= n {
            break;
        }
        // 6.1's verifier loses the loop's bound on the index the compiler derives ("invalid
        // access to map value, off=416"): masked after a volatile reload, it sees one.
        // SAFETY: reading a local.
        let i = unsafe { core::ptr::read_volatile(&raw const i) } & (MEMO_CHECKS - 1);
        let at = (memo.offsets[i] as usize / 8) & (WORDS - 1);
        if words[at] != memo.words[i] {
            return false;
        }
    }
    true
}

/// The path or peer address of a kept creation, into its `KEPT_AUX` bytes; `None` when it
/// does not fit (the creation is sent with it instead).
#[inline(always)]
fn read_aux(args: &[u64; 6], dst: &mut [u8; KEPT_AUX], aux: Aux) -> Option<u32> {
    match aux {
        Aux::None | Aux::FdPair(_) => Some(0),
        Aux::Path(n) => {
            let src = args[n & 3] as *const u8;
            // A plain copy of the whole area first: the string copy, which scans byte by
            // byte, cost 80 ns of a kept open here. Userspace ends the path at its NUL (a
            // path of KEPT_AUX bytes or more is cut there). Near the end of a mapping the
            // plain copy can fail where the string one would not.
            // SAFETY: the helper checks the user pointer; KEPT_AUX bytes fit the destination.
            if unsafe { read_user_raw(dst.as_mut_ptr().cast(), KEPT_AUX as u32, src.cast()) } == 0 {
                return Some(KEPT_AUX as u32);
            }
            // SAFETY: as above.
            let r = unsafe {
                bpf_probe_read_user_str(dst.as_mut_ptr().cast(), KEPT_AUX as u32, src.cast())
            };
            (r > 0).then(|| r as u32 - 1)
        }
        Aux::PeerAddr => {
            let (addr, addrlen) = (args[1], args[2]);
            if addr == 0 || addrlen == 0 {
                return Some(0);
            }
            // SAFETY: a user pointer the kernel just wrote through.
            let len = unsafe { bpf_probe_read_user(addrlen as *const u32) }.ok()?;
            if len == 0 {
                return Some(0);
            }
            if len as usize > KEPT_AUX {
                return None;
            }
            // SAFETY: reading a local, for a bound the verifier keeps (see `words_match`).
            let len = unsafe { core::ptr::read_volatile(&raw const len) } & (KEPT_AUX as u32 - 1);
            let len = if len == 0 { KEPT_AUX as u32 } else { len };
            // SAFETY: bounded by the destination's KEPT_AUX bytes.
            let r = unsafe { read_user_raw(dst.as_mut_ptr().cast(), len, addr as *const _) };
            (r == 0).then_some(len)
        }
    }
}

/// `close(fd)` is entered by the current thread (`fdt_keep_close`): a kept descriptor's entry
/// is marked as this close's, for its return (`close_returned`) to count it as a pair.
///
/// Marked at entry, removed at return: at entry the descriptor is still open, so no other
/// thread can create at its number, and the mark tells every other party to leave the entry
/// to this close. At return the number is free: another thread's creation may take it, and a
/// plain look-then-delete there removed that creation's own entry when it came in between
/// (`fd_race.c` lost a descriptor so, one run in six).
#[inline(always)]
pub fn close_entered(fd: u64) {
    let thread = bpf_get_current_pid_tgid();
    let tgid = (thread >> 32) as u32;
    let Some(entry) = KEPT.get_ptr_mut(key(tgid, fd)) else {
        return;
    };
    // SAFETY: the entry of a descriptor this thread holds open: nobody else writes it now
    // (userspace only reads or removes it whole).
    unsafe {
        if enabled() && !held(tgid, (*entry).ts_ns) {
            (*entry).closing = thread;
        }
    }
}

/// `close(fd)` returned at `ts` in thread `thread` (pid_tgid): true when its entry was marked
/// at entry and is now counted as a pair (nothing is sent).
#[inline(never)]
fn close_returned(thread: u64, fd: u64, ts: u64) -> bool {
    let tgid = (thread >> 32) as u32;
    let key = key(tgid, fd);
    // SAFETY: a lookup; the fields are copied out at once.
    let Some((created, site, nr, closing)) =
        (unsafe { KEPT.get(key) }).map(|k| (k.ts_ns, k.site, k.nr, k.closing))
    else {
        return false;
    };
    // Only this close removes its marked entry: the remove below cannot take another's.
    if closing != thread || KEPT.remove(key).is_err() {
        return false;
    }
    pair(tgid, site, nr, ts.wrapping_sub(created));
    true
}

/// Whether a hold covers a descriptor of `tgid` created at `created`.
#[inline(always)]
fn held(tgid: u32, created: u64) -> bool {
    // SAFETY: a lookup; the value is copied out at once.
    unsafe { HOLDS.get(tgid) }.is_some_and(|&since| created < since)
}

/// Holds `tgid`'s kept descriptors created before `ts` for userspace (see `FDT_HOLDS`), for
/// the record stamped `ts` that needs them, which the caller has just output: a close the
/// hold sends is then behind that record in the ring, so userspace takes the entry before it
/// applies the close. (Held first, such a close could reach userspace a batch before the
/// record, find nothing to close, and leave the entry to be taken as open for good.)
#[inline(always)]
pub fn hold(tgid: u32, ts: u64) {
    if enabled() {
        let _ = HOLDS.insert(tgid, ts, 0);
    }
}

/// Counts a kept descriptor of site `site` that lived `life_ns` and is gone.
#[inline(always)]
fn pair(tgid: u32, site: u32, nr: u32, life_ns: u64) {
    let key = PairKey {
        tgid,
        site,
        nr,
        pad: 0,
    };
    let mut entry = PAIRS.get_ptr_mut(key);
    if entry.is_none() {
        // Another CPU may insert it first: either way there is one entry after this.
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "by value, the 200-byte static would be copied onto the 512-byte stack"
        )]
        let _ = PAIRS.insert(key, &NO_PAIRS, BPF_NOEXIST);
        entry = PAIRS.get_ptr_mut(key);
    }
    let Some(entry) = entry else {
        return;
    };
    let bucket = lifetime_bucket(life_ns / 1000) & 63;
    let bucket = if bucket >= LIFETIME_BUCKETS {
        LIFETIME_BUCKETS - 1
    } else {
        bucket
    };
    // The BPF target's core has no atomic types; the intrinsic compiles to the atomic add
    // instruction the verifier accepts on map values.
    // SAFETY: a value of this program's map, updated by atomic adds only (the probes on other
    // CPUs add too; userspace only reads).
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).count, 1);
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*entry).buckets[bucket], 1);
    }
    count(Counter::PairClosed);
}

/// A creation being kept, assembled in per-CPU memory (see [`keep`]).
#[repr(C)]
pub struct Keeping {
    memo_key: MemoKey,
    fd_key: u64,
    kept: Kept,
}
