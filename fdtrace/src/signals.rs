//! SIGINT and SIGTERM, caught so fdtrace can report (and forward them to `run`'s command), and
//! SIGHUP for `serve`, which reopens its log then (after logrotate moved it).

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

static PENDING: AtomicU32 = AtomicU32::new(0);
static LAST: AtomicI32 = AtomicI32::new(0);
static FROM_KERNEL: AtomicU32 = AtomicU32::new(0);
static HANGUPS: AtomicU32 = AtomicU32::new(0);

/// A signal fdtrace received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub signal: i32,
    /// Sent by the kernel, e.g. Ctrl-C at the terminal, which also signals the whole foreground
    /// process group (so `run`'s command already got its own copy).
    pub from_terminal: bool,
}

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO.
    let code = unsafe { (*info).si_code };
    if sig == libc::SIGHUP {
        HANGUPS.fetch_add(1, Ordering::SeqCst);
        return;
    }
    FROM_KERNEL.store(u32::from(code == libc::SI_KERNEL), Ordering::SeqCst);
    LAST.store(sig, Ordering::SeqCst);
    PENDING.fetch_add(1, Ordering::SeqCst);
}

pub fn install() {
    catch(&[libc::SIGINT, libc::SIGTERM]);
}

/// Also catches SIGHUP (see [`take_hangup`]), which otherwise ends the process.
pub fn install_hangup() {
    catch(&[libc::SIGHUP]);
}

fn catch(signals: &[libc::c_int]) {
    for &sig in signals {
        // SAFETY: a zeroed sigaction with a handler that only touches atomics.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&raw mut act.sa_mask);
            libc::sigaction(sig, &raw const act, std::ptr::null_mut());
        }
    }
}

/// The signal received since the last call, if any.
pub fn take() -> Option<Received> {
    if PENDING.swap(0, Ordering::SeqCst) == 0 {
        return None;
    }
    Some(Received {
        signal: LAST.load(Ordering::SeqCst),
        from_terminal: FROM_KERNEL.load(Ordering::SeqCst) != 0,
    })
}

/// Whether SIGHUP came since the last call.
pub fn take_hangup() -> bool {
    HANGUPS.swap(0, Ordering::SeqCst) != 0
}
