//! The current thread's CPython frames, for processes userspace marked as CPython.
//!
//! Native frames inside the interpreter (`_PyEval_EvalFrameDefault`) say nothing about which
//! Python function opened a descriptor. The probe walks the interpreter's own structures
//! instead: `_PyRuntime` → main interpreter → its thread states, the one whose
//! `native_thread_id` is this thread (the GIL is released around blocking syscalls, so "the
//! thread holding the GIL" would be the wrong one) → its current frame → `previous` links.
//! Per frame it copies the code object's address and the last instruction pointer; userspace
//! reads names and line tables from the process. Offsets per version come from userspace.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user};
use fdtrace_common::{PY_FRAMES_MAX, PY_THREADS_MAX, PyFrame, StackedRecord};

use crate::maps::PYTHON;

#[inline(always)]
fn read_u64(addr: u64) -> u64 {
    // SAFETY: a checked read of user memory; a fault yields 0, which ends every walk.
    unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0)
}

/// Fills the start of `rec.tail` with the calling thread's frames, innermost first; returns
/// how many.
#[inline(always)]
pub fn frames(rec: &mut StackedRecord) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    // SAFETY: a lookup; the value is copied out at once.
    let Some(py) = (unsafe { PYTHON.get(tgid) }).copied() else {
        return 0;
    };
    let off = py.offsets;
    let interp = read_u64(py.runtime + u64::from(off.runtime_interpreters_head));
    if interp == 0 {
        return 0;
    }
    let mut tstate = read_u64(interp + u64::from(off.interp_threads_head));
    let mut mine = 0;
    for _ in 0..PY_THREADS_MAX {
        if tstate == 0 {
            break;
        }
        if read_u64(tstate + u64::from(off.tstate_native_thread_id)) as u32 == tid {
            mine = tstate;
            break;
        }
        tstate = read_u64(tstate + u64::from(off.tstate_next));
    }
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
        let instr = read_u64(frame + u64::from(off.frame_prev_instr));
        let entry = read_u64(frame + u64::from(off.frame_is_entry)) & 0xff;
        let slot = PyFrame {
            code: code | u64::from(entry != 0),
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
