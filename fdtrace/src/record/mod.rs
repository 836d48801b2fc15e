//! Recordings for bug reports: exactly what the model consumed, in a self-contained file that
//! replays into the identical model on another machine (DESIGN.md: "Recordings carry
//! symbolized frames and never raw stack bytes or other process memory").
//!
//! [`format`] describes the file; [`writer`] records a live session, [`reader`] reads a file
//! back (whole, cut or damaged; [`v2`] spells out the previous format), [`replay`] plays it
//! through the model, [`redact`] hides paths, addresses and arguments.

pub mod flight;
pub mod format;
pub mod reader;
pub mod redact;
pub mod replay;
pub mod v2;
pub mod writer;

pub use format::{Command, Entry, Header};
pub use reader::{Damage, FileError, ReadError, Recording};
pub use replay::Replay;
pub use writer::{RecordStats, Recorder, SessionRecorder};

use crate::{clock::WallClock, model::Pid, procfs};

impl Header {
    /// A header for a recording starting now on this machine, of the processes `commands`.
    pub fn here(clock: WallClock, commands: Vec<Command>, stack_bytes: u32) -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Self {
            fdtrace_version: env!("CARGO_PKG_VERSION").to_string(),
            host: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
            start_mono_ns: crate::clock::monotonic_ns(),
            clock,
            commands,
            redacted: false,
            stack_bytes,
        }
    }
}

impl Command {
    /// What /proc says about a running process: its command line and limit.
    pub fn of_process(pid: Pid) -> Self {
        let argv = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            pid,
            argv,
            limit: procfs::limit(pid).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests;
