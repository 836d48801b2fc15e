//! The terminal while the UI runs: raw mode and the alternate screen, restored by a Drop
//! guard and by a panic hook; standard error goes to the log file meanwhile, so nothing a
//! library prints can tear the screen.

use std::{
    io::{self, Stdout},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
    sync::{Arc, Mutex},
};

use crossterm::{
    cursor,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{Terminal, backend::CrosstermBackend};

type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

pub(super) struct TerminalGuard {
    pub(super) terminal: Terminal<CrosstermBackend<Stdout>>,
    /// The real standard error, put back on restore.
    saved_stderr: Arc<Mutex<Option<OwnedFd>>>,
    previous_hook: Option<Arc<PanicHook>>,
}

impl TerminalGuard {
    pub(super) fn enter(log: &Path) -> io::Result<Self> {
        let saved_stderr = Arc::new(Mutex::new(redirect_stderr(log)));
        let previous: Arc<PanicHook> = Arc::new(std::panic::take_hook());
        {
            let previous = Arc::clone(&previous);
            let saved = Arc::clone(&saved_stderr);
            std::panic::set_hook(Box::new(move |info| {
                restore(&saved);
                previous(info);
            }));
        }
        let guard_parts = (saved_stderr, previous);
        let setup = || -> io::Result<Terminal<CrosstermBackend<Stdout>>> {
            terminal::enable_raw_mode()?;
            crossterm::execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
            Terminal::new(CrosstermBackend::new(io::stdout()))
        };
        match setup() {
            Ok(terminal) => Ok(Self {
                terminal,
                saved_stderr: guard_parts.0,
                previous_hook: Some(guard_parts.1),
            }),
            Err(err) => {
                restore(&guard_parts.0);
                Err(err)
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore(&self.saved_stderr);
        // Put the previous hook back so a later panic prints as usual.
        if let Some(previous) = self.previous_hook.take() {
            let _ = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| previous(info)));
        }
    }
}

/// Leaves raw mode and the alternate screen and gives standard error back. Idempotent.
fn restore(saved_stderr: &Mutex<Option<OwnedFd>>) {
    let _ = terminal::disable_raw_mode();
    let _ = crossterm::execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    if let Ok(mut saved) = saved_stderr.lock()
        && let Some(fd) = saved.take()
    {
        // SAFETY: both descriptors are open; dup2 onto 2 puts the saved terminal back.
        unsafe { libc::dup2(fd.as_raw_fd(), libc::STDERR_FILENO) };
    }
}

/// Points descriptor 2 at the log file; returns the original to restore, if it worked.
fn redirect_stderr(log: &Path) -> Option<OwnedFd> {
    let file = super::logfile::open(log).ok()?;
    let saved = io::stderr().as_fd().try_clone_to_owned().ok()?;
    // SAFETY: both descriptors are open; dup2 replaces 2 atomically.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return None;
    }
    Some(saved)
}
