//! Every map the probes use, and the only code that writes to the ring buffer.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf, ring_buf::RingBufBytes},
};
use fdtrace_common::{
    COUNTERS as COUNTER_SLOTS, Counter, ExitStash, Fresh, Kept, Memo, MemoKey, Outbound, PairKey,
    Pairs, PyProc, RecordHeader, STACK_MAX, StackedRecord, Traced, select,
};

/// Processes being traced, by tgid. Userspace seeds it; the fork probe adds children.
#[map(name = "FDT_TRACED")]
pub static TRACED: HashMap<u32, Traced> = HashMap::with_max_entries(16384, 0);

/// 16 MiB: PLATFORM.md measured 2 MiB losing most stack-bearing records under a tight loop.
/// Userspace may resize it at load time.
#[map(name = "FDT_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// A quarter of the ring's size, set by userspace at load time with the size.
#[unsafe(no_mangle)]
static FDT_WAKEUP_BYTES: u64 = 4 << 20;

/// The `sys_exit` program `fdt_keep` hands what it did not keep to, by tail call: one program
/// on the tracepoint instead of two, so every syscall on the machine pays one dispatch, and
/// what the keeping program decided needs no second look (as `fdt_sys_exit` once took, in
/// the kept-descriptor map, for every kept creation).
#[map(name = "FDT_SYS_EXIT_NEXT")]
pub static SYS_EXIT_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map(name = "FDT_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Traced processes running CPython: where `_PyRuntime` is and the version's offsets.
#[map(name = "FDT_PYTHON")]
pub static PYTHON: HashMap<u32, PyProc> = HashMap::with_max_entries(16384, 0);

/// Comms that select a process (`--comm`), NUL-padded as `bpf_get_current_comm` returns them.
/// Userspace fills it before the probes can see an exec.
#[map(name = "FDT_SEL_COMMS")]
pub static SELECT_COMMS: HashMap<[u8; select::COMM_LEN], u8> =
    HashMap::with_max_entries(select::MAX_ENTRIES, 0);

/// Cgroup v2 ids that select the processes in them and below them (`--cgroup`, `--container`).
#[map(name = "FDT_SEL_CGROUPS")]
pub static SELECT_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(select::MAX_ENTRIES, 0);

/// Connections accepted at the limit, by (tgid << 32 | fd), until their close. LRU: one that
/// outlives its process is pushed out by newer ones rather than filling the map.
#[map(name = "FDT_FRESH")]
pub static FRESH: LruHashMap<u64, Fresh> = LruHashMap::with_max_entries(4096, 0);

/// Outbound TCP connections of traced processes, by `struct sock`, from connect to the end of
/// their first exchange (see [`Outbound`]). LRU: a connection whose end the probe never sees
/// (its process's tracing stopped) is pushed out by newer ones.
#[map(name = "FDT_OUTBOUND")]
pub static OUTBOUND: LruHashMap<u64, Outbound> = LruHashMap::with_max_entries(16384, 0);

/// Tables at exit the ring had no room for, by tgid (see [`ExitStash`]). LRU: userspace takes
/// each when it notices the process gone; one it never takes is pushed out.
#[map(name = "FDT_EXITS")]
pub static EXITS: LruHashMap<u32, ExitStash> = LruHashMap::with_max_entries(1024, 0);

/// Call sites userspace unwound, by registers (see [`Memo`]): 8192 of 800 bytes, 6.5 MB.
#[map(name = "FDT_MEMOS")]
pub static MEMOS: HashMap<MemoKey, Memo> = HashMap::with_max_entries(8192, 0);

/// Descriptors kept in the kernel (see `kept`), by (tgid << 32 | fd). 32768 entries are about
/// 6 MB; a creation that finds the map full is sent, as without it.
#[map(name = "FDT_KEPT")]
pub static KEPT: HashMap<u64, Kept> = HashMap::with_max_entries(32768, 0);

/// Per call site, descriptors created and closed in the kernel. Userspace deletes a
/// process's entries after its exit.
#[map(name = "FDT_PAIRS")]
pub static PAIRS: HashMap<PairKey, Pairs> = HashMap::with_max_entries(16384, 0);

/// Processes whose kept descriptors userspace needs before their closes (see `FDT_HOLDS`).
#[map(name = "FDT_HOLDS")]
pub static HOLDS: HashMap<u32, u64> = HashMap::with_max_entries(4096, 0);

/// Where a kept creation is assembled before its insert (too large for the stack).
#[map(name = "FDT_KEEPING")]
pub static KEEPING: PerCpuArray<crate::kept::Keeping> = PerCpuArray::with_max_entries(1, 0);

/// The stack words a memo compares, read from `sp` in one copy.
#[map(name = "FDT_MEMO_WORDS")]
pub static MEMO_WORDS: PerCpuArray<[u64; STACK_MAX / 8]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "FDT_SCRATCH")]
pub static SCRATCH: PerCpuArray<StackedRecord> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot; programs do not nest on one CPU.
        unsafe { *slot += 1 };
    }
}

/// `bpf_ringbuf_query`'s flag for the bytes written and not yet consumed.
const AVAIL_DATA: u64 = 0;

#[inline(always)]
fn quarter_ring() -> u64 {
    // SAFETY: a global written only by the loader.
    unsafe { core::ptr::read_volatile(&raw const FDT_WAKEUP_BYTES) }
}

/// More than half the ring waits for the reader: creations then go out without their stack
/// (issue 18's "degrade, don't drop"). A stack is 4 KiB of a 4.4 KiB record, so the other half
/// holds ten times as many events stackless, and a descriptor without frames leaves the table
/// exact where a lost creation would not.
#[inline(always)]
pub fn ring_over_half() -> bool {
    EVENTS.query(AVAIL_DATA) > 2 * quarter_ring()
}

/// Records go out without waking the reader, which drains on a short timer: a wakeup per
/// record tripled the traced program's cost here (PLATFORM.md). The reader is woken only when
/// the ring is a quarter full, so a burst cannot overrun it between timer ticks.
///
/// Past a quarter every record forces a wakeup, an irq_work self-IPI (18% of a 4-thread
/// storm's time in perf, an MSR write that exits to the hypervisor). Forcing one per 64 KiB
/// written instead made the storm 1.7x faster, and the reader, no faster, then lost 177k
/// events of the single-threaded loop, which loses none: those IPIs are the storm's brake,
/// and stay until balanced descriptors stay in the kernel (issue 18).
#[inline(always)]
fn wakeup_flag() -> u64 {
    if EVENTS.query(AVAIL_DATA) > quarter_ring() {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

#[inline(always)]
pub fn emit_header(header: &RecordHeader) -> Result<(), ()> {
    EVENTS
        .output::<RecordHeader>(header, wakeup_flag())
        .map_err(|_| {
            count(Counter::RingFull);
        })
}

/// Outputs the first `len` bytes of the assembled record.
#[inline(always)]
pub fn emit_scratch(rec: &StackedRecord, len: usize) -> Result<(), ()> {
    if len > size_of::<StackedRecord>() {
        return Err(());
    }
    // SAFETY: len is within the record, checked above.
    let bytes = unsafe { core::slice::from_raw_parts(core::ptr::from_ref(rec).cast::<u8>(), len) };
    EVENTS.output::<[u8]>(bytes, wakeup_flag()).map_err(|_| {
        count(Counter::RingFull);
    })
}

/// Reserves `C` bytes of the ring, for a caller with a smaller record to fall back to (which
/// counts a full ring if it does not fit either).
#[inline(always)]
pub fn reserve_or_fall_back<const C: usize>() -> Option<RingBufBytes<'static>> {
    EVENTS.reserve_bytes(C, 0)
}

/// Reserves `C` bytes of the ring, counting a full ring.
#[inline(always)]
pub fn reserve<const C: usize>() -> Option<RingBufBytes<'static>> {
    let entry = EVENTS.reserve_bytes(C, 0);
    if entry.is_none() {
        count(Counter::RingFull);
    }
    entry
}

#[inline(always)]
pub fn submit(entry: RingBufBytes<'_>) {
    entry.submit(wakeup_flag());
}
