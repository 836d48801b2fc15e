//! The current thread's CPython frames, for processes userspace marked as CPython.
//!
//! Native frames inside the interpreter (`_PyEval_EvalFrameDefault`) say nothing about which
//! Python function opened a descriptor. The probe walks the interpreter's own structures
//! instead: `_PyRuntime` → main interpreter → its thread states, the one whose
//! `native_thread_id` (3.10: the tid in the glibc thread descriptor its `thread_id` points to)
//! is this thread (the GIL is released around blocking syscalls, so "the thread holding the
//! GIL" would be the wrong one) → its current frame → `previous` links.
//! Per frame it copies the code object's address with the frame's owner byte in its low bits,
//! and the instruction word; userspace reads names and line tables from the process and
//! interprets the owner byte and the instruction word per version. Offsets per version come
//! from userspace, so one walk serves 3.10 (`PyFrameObject`s linked by `f_back`) to 3.13.

use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid, bpf_probe_read_user,
        generated::bpf_probe_read_user as bpf_probe_read_user_raw,
    },
};
use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use fdtrace_common::{
    CODE_COPIES, CODE_RECORD, PY_FRAMES_MAX, PY_THREADS_MAX, PyFrame, PyOffsets, PyProc,
    RecordHeader, StackedRecord, kind,
};

use crate::maps::{self, PYTHON};

/// Code objects already announced, per process registration (see [`announce_codes`]). An LRU:
/// a process that exits leaves its entries to age out, and an entry lost early only means a
/// second announcement.
#[map]
static CODES_SEEN: LruHashMap<CodeKey, u8> = LruHashMap::with_max_entries(65536, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct CodeKey {
    tgid: u32,
    generation: u32,
    code: u64,
}

/// The innermost frames searched for code objects not yet announced, and how many one record
/// announces: a leak's own function and its nearest callers first, the rest with the next
/// records of that path.
const CODES_CHECKED: usize = 8;
const CODES_PER_RECORD: usize = 3;

#[inline(always)]
fn read_u64(addr: u64) -> u64 {
    // SAFETY: a checked read of user memory; a fault yields 0, which ends every walk.
    unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0)
}

/// The interpreter of process `tgid`, if userspace found one: a reference into the map, not a
/// copy (an 80-byte copy held across the record's assembly overran the 512-byte stack).
#[inline(always)]
pub fn interpreter(tgid: u32) -> Option<&'static PyProc> {
    // SAFETY: a lookup; the entry stays valid for the program's run (RCU), and a concurrent
    // update by userspace can at worst give a torn value, which only misreads frames.
    unsafe { PYTHON.get(tgid) }
}

/// Fills the start of `rec.tail` with the calling thread's frames, innermost first; returns
/// how many.
#[inline(always)]
pub fn frames(rec: &mut StackedRecord, py: &PyProc) -> u32 {
    let Some(tid) = thread_id(py) else {
        return 0;
    };
    let off = py.offsets;
    let interp = read_u64(py.runtime + u64::from(off.runtime_interpreters_head));
    if interp == 0 {
        return 0;
    }
    let first = read_u64(interp + u64::from(off.interp_threads_head));
    // One branch here rather than one per thread in the loop: a branch inside it multiplied
    // the verifier's work (loading took 0.44 s of kernel time instead of 0.1 s).
    let mine = if off.thread_tid == 0 {
        find_thread::<false>(first, &off, tid)
    } else {
        find_thread::<true>(first, &off, tid)
    };
    if mine == 0 {
        return 0;
    }
    let holder = if off.tstate_cframe == 0 {
        mine
    } else {
        read_u64(mine + u64::from(off.tstate_cframe))
    };
    let mut frame = read_u64(holder + u64::from(off.current_frame));
    let mut n = 0u32;
    for i in 0..PY_FRAMES_MAX {
        if frame == 0 {
            break;
        }
        let code = read_u64(frame + u64::from(off.frame_code));
        let instr = read_u64(frame + u64::from(off.frame_instr));
        // Code objects are 8-aligned: the low 3 bits carry the owner byte's, which is all
        // userspace needs of it (is_entry is 0/1, owner 0-3).
        let owner = read_u64(frame + u64::from(off.frame_owner)) & 7;
        let slot = PyFrame {
            code: (code & !7) | owner,
            instr,
        };
        // The tail is a byte array: write the frame unaligned, as bytes are laid out.
        let dst = rec.tail.as_mut_ptr().wrapping_add(i * size_of::<PyFrame>());
        // SAFETY: i < PY_FRAMES_MAX frames fit the Python section at the tail's start.
        unsafe { core::ptr::write_unaligned(dst.cast::<PyFrame>(), slot) };
        n += 1;
        frame = read_u64(frame + u64::from(off.frame_previous));
    }
    n
}

/// Sends a [`kind::CODE`] record for each code object among the innermost frames of `rec`
/// (its first `count` Python frames, up to [`CODES_CHECKED`]) that this process has not
/// announced yet, up to [`CODES_PER_RECORD`]. Names and line tables are then known even if the process is gone
/// before userspace reads its records. Called once `rec` is out: the creation's own record
/// comes first, and the sys_exit programs' stack has no room left for this (their largest
/// frame is 368 of 512 bytes, and 6.1 refused a BPF-to-BPF call for this with "combined stack
/// size of 2 calls is 640"), so its temporaries live in a per-CPU map.
#[inline(always)]
pub fn announce_codes(rec: &StackedRecord, count: u32, py: &PyProc) {
    let Some(tmp) = CODE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; programs do not nest on one CPU here.
    let tmp = unsafe { &mut *tmp };
    // Rounds of "find the innermost code object not announced yet, announce it": the search
    // leaves nothing in registers but whether it found one (the key is in the scratch map),
    // so however many frames it looked at, the verifier checks one announcement per round,
    // where announcing inside the search multiplied its work by the frames (0.8 s more to
    // load with 6 of them).
    for _ in 0..CODES_PER_RECORD {
        let mut found = false;
        for i in 0..CODES_CHECKED {
            if i as u32 >= count {
                break;
            }
            let src = rec.tail.as_ptr().wrapping_add(i * size_of::<PyFrame>());
            // SAFETY: i < PY_FRAMES_MAX frames lie at the tail's start, written unaligned.
            let frame = unsafe { core::ptr::read_unaligned(src.cast::<PyFrame>()) };
            tmp.key = CodeKey {
                tgid: rec.header.tgid,
                generation: u32::from(py.generation),
                code: frame.code & !7,
            };
            // SAFETY: a lookup; only presence is used.
            if unsafe { CODES_SEEN.get(tmp.key) }.is_none() {
                found = true;
                break;
            }
        }
        // Marked seen even when the copy failed: a code object that cannot be copied now
        // (a full ring) is named from the live process instead, as before.
        if !found || CODES_SEEN.insert(tmp.key, 1, 0).is_err() {
            return;
        }
        announce(&rec.header, tmp, py);
    }
}

/// What [`announce_codes`] works with, in a per-CPU map rather than on the stack: every
/// word read from the process lands here, not in a stack slot.
#[repr(C)]
struct CodeScratch {
    key: CodeKey,
    /// The code object's name, file name and line table objects.
    objects: [u64; 3],
    /// A length word read from an object, then the length to copy.
    word: u64,
    lens: [u32; 4],
}

#[map]
static CODE_SCRATCH: PerCpuArray<CodeScratch> = PerCpuArray::with_max_entries(1, 0);

/// Copies a code object and the objects naming it into one ring record.
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "the kernel aligns ring records to 8 bytes, as the header needs"
)]
fn announce(creation: &RecordHeader, tmp: &mut CodeScratch, py: &PyProc) -> bool {
    const NAME_AT: usize = size_of::<RecordHeader>() + CODE_COPIES[0];
    const FILE_AT: usize = NAME_AT + CODE_COPIES[1];
    const TABLE_AT: usize = FILE_AT + CODE_COPIES[2];
    let code = tmp.key.code;
    let fields = [py.code_qualname, py.code_filename, py.code_linetable];
    for (i, field) in fields.into_iter().enumerate() {
        tmp.objects[i] = 0;
        read_into(&mut tmp.objects[i], code + u64::from(field));
        if tmp.objects[i] == 0 {
            return false;
        }
    }
    let Some(mut entry) = maps::reserve::<CODE_RECORD>() else {
        return false;
    };
    let dst = entry.as_mut_ptr();
    // SAFETY: each copy stays inside its part of the CODE_RECORD-byte reservation (`copy`
    // bounds it by the part's size).
    unsafe {
        tmp.word = CODE_COPIES[0] as u64;
        tmp.lens[0] = copy(
            dst.add(size_of::<RecordHeader>()),
            CODE_COPIES[0],
            code,
            tmp,
        );
        // A str holds at most 4 bytes per character after a header of at most 72 bytes
        // (3.10, non-ASCII); a bytes object 32 bytes of header, then its size.
        read_into(&mut tmp.word, tmp.objects[0] + STR_LENGTH);
        tmp.word = tmp.word.saturating_mul(4).saturating_add(72);
        tmp.lens[1] = copy(dst.add(NAME_AT), CODE_COPIES[1], tmp.objects[0], tmp);
        read_into(&mut tmp.word, tmp.objects[1] + STR_LENGTH);
        tmp.word = tmp.word.saturating_mul(4).saturating_add(72);
        tmp.lens[2] = copy(dst.add(FILE_AT), CODE_COPIES[2], tmp.objects[1], tmp);
        read_into(&mut tmp.word, tmp.objects[2] + BYTES_SIZE);
        tmp.word = tmp.word.saturating_add(BYTES_DATA);
        tmp.lens[3] = copy(dst.add(TABLE_AT), CODE_COPIES[3], tmp.objects[2], tmp);
    }
    // Field by field: a RecordHeader assembled on the stack does not fit there.
    let hdr = dst.cast::<RecordHeader>();
    // SAFETY: the header fits at the start of the reservation, which is 8-aligned.
    unsafe {
        (*hdr).kind = kind::CODE;
        (*hdr).nr = 0;
        (*hdr).tgid = creation.tgid;
        (*hdr).tid = creation.tid;
        // Just before the creation's time: written after it, but userspace merges records by
        // time, and naming the creation's frames needs this first.
        (*hdr).ts_ns = creation.ts_ns.wrapping_sub(1);
        (*hdr).ret = 0;
        (*hdr).args[0] = code;
        (*hdr).args[1] = tmp.objects[0];
        (*hdr).args[2] = tmp.objects[1];
        (*hdr).args[3] = tmp.objects[2];
        (*hdr).args[4] = u64::from(tmp.lens[0]) | u64::from(tmp.lens[1]) << 32;
        (*hdr).args[5] = u64::from(tmp.lens[2]) | u64::from(tmp.lens[3]) << 32;
    }
    maps::submit(entry);
    true
}

/// `ob_size` of a `str` (its length in characters) and of a `bytes` object, and where a
/// bytes object's data starts: the same in 3.10 to 3.13.
const STR_LENGTH: u64 = 16;
const BYTES_SIZE: u64 = 16;
const BYTES_DATA: u64 = 32;

/// Reads the word at `src` into `dst` (0 when the read fails).
#[inline(always)]
fn read_into(dst: &mut u64, src: u64) {
    // SAFETY: an 8-byte read into an 8-byte destination; the helper zeroes it on a fault.
    unsafe { bpf_probe_read_user_raw(core::ptr::from_mut(dst).cast(), 8, src as *const _) };
}

/// Reads `min(tmp.word, cap)` bytes (at least 1; `cap` a power of two) from user memory at
/// `src` into `dst`; returns how many, or 0 when the read failed.
#[inline(always)]
unsafe fn copy(dst: *mut u8, cap: usize, src: u64, tmp: &mut CodeScratch) -> u32 {
    tmp.word = tmp.word.min(cap as u64).max(1);
    // As in the stack copy: older verifiers (6.1) lose the bound above, so the length is
    // masked after a volatile reload (from the map, not a stack slot), which changes nothing
    // for 1 <= word <= cap.
    // SAFETY: reading a field of the scratch value.
    let want = unsafe { core::ptr::read_volatile(&raw const tmp.word) };
    let len = ((want - 1) & (cap as u64 - 1)) + 1;
    // SAFETY: the caller's destination has room for cap bytes.
    let r = unsafe { bpf_probe_read_user_raw(dst.cast(), len as u32, src as *const _) };
    if r == 0 { len as u32 } else { 0 }
}

/// This thread's id as CPython stored it: the host's, or the one in the process's own pid
/// namespace (a container's) when userspace said which namespace that is.
#[inline(always)]
fn thread_id(py: &PyProc) -> Option<u32> {
    if py.pidns_ino == 0 {
        return Some(bpf_get_current_pid_tgid() as u32);
    }
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes at most size_of::<bpf_pidns_info>() bytes into `ns`.
    let r = unsafe {
        bpf_get_ns_current_pid_tgid(
            py.pidns_dev,
            py.pidns_ino,
            &raw mut ns,
            size_of::<bpf_pidns_info>() as u32,
        )
    };
    (r == 0).then_some(ns.pid)
}

/// The thread state of kernel thread `tid` among the list starting at `tstate`, or 0.
/// `PTHREAD`: the state holds a `pthread_t` (3.10), and the kernel id is `thread_tid` bytes
/// into the C library's thread descriptor it points to.
#[inline(always)]
fn find_thread<const PTHREAD: bool>(mut tstate: u64, off: &PyOffsets, tid: u32) -> u64 {
    for _ in 0..PY_THREADS_MAX {
        if tstate == 0 {
            return 0;
        }
        let mut id = read_u64(tstate + u64::from(off.tstate_thread_id));
        if PTHREAD {
            // A null pthread_t reads as a fault, which is 0: no match.
            id = read_u64(id + u64::from(off.thread_tid));
        }
        if id as u32 == tid {
            return tstate;
        }
        tstate = read_u64(tstate + u64::from(off.tstate_next));
    }
    0
}
