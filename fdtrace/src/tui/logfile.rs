//! Logs go to a file while the terminal UI owns the screen (STYLE.md habit 6).

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

/// Whether log records are also printed on standard error (`--debug-probes`, so that a user on
/// an odd kernel sees the probes' diagnostics at once). Off while the terminal UI owns the
/// screen, when standard error is the log itself.
pub static ECHO: AtomicBool = AtomicBool::new(false);

/// The installed logger and its path, for [`reopen`].
static INSTALLED: std::sync::OnceLock<(&'static FileLogger, PathBuf)> = std::sync::OnceLock::new();

/// `$XDG_STATE_HOME/fdtrace.log` when that is set, else `/tmp/fdtrace-<uid>.log`.
pub fn log_path() -> PathBuf {
    match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => Path::new(&dir).join("fdtrace.log"),
        // SAFETY: getuid cannot fail.
        None => PathBuf::from(format!("/tmp/fdtrace-{}.log", unsafe { libc::getuid() })),
    }
}

/// Opens the log for appending. Never follows a symbolic link: as root in /tmp, a link
/// planted by another user must not redirect our writes.
pub(super) fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

struct FileLogger {
    file: Mutex<File>,
    level: log::LevelFilter,
    /// The level for fdtrace's own records and its probes' (whose target is the probes'
    /// crate, `fdtrace`): `--debug-probes` raises it without aya's own debug chatter.
    own_level: log::LevelFilter,
}

impl log::Log for FileLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        let level = if metadata.target().starts_with("fdtrace") {
            self.own_level
        } else {
            self.level
        };
        metadata.level() <= level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = crate::clock::rfc3339(i128::from(crate::clock::now(libc::CLOCK_REALTIME)));
        let line = format!(
            "{now} {} {}: {}",
            record.level(),
            record.target(),
            record.args()
        );
        if let Ok(mut file) = self.file.lock() {
            let _ = writeln!(file, "{line}");
        }
        if ECHO.load(Ordering::Relaxed) {
            let _ = writeln!(std::io::stderr(), "fdtrace: {line}");
        }
    }

    fn flush(&self) {
        if let Ok(mut file) = self.file.lock() {
            let _ = file.flush();
        }
    }
}

/// Sends the `log` crate's records to `path` (level from `FDTRACE_LOG`, default info; debug
/// and echoed on standard error with `debug`). Does nothing when the file cannot be opened or a
/// logger is already installed.
pub fn install(path: &Path, debug: bool) {
    let Ok(file) = open(path) else {
        return;
    };
    let level = std::env::var("FDTRACE_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let own_level = if debug {
        level.max(log::LevelFilter::Debug)
    } else {
        level
    };
    ECHO.store(debug, Ordering::Relaxed);
    // Leaked once: the logger lives as long as the process (log's `std` feature is off).
    let logger: &'static FileLogger = Box::leak(Box::new(FileLogger {
        file: Mutex::new(file),
        level,
        own_level,
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level.max(own_level));
        let _ = INSTALLED.set((logger, path.to_path_buf()));
    }
}

/// Opens the log's path again, for logrotate (`serve` on SIGHUP): records go to the new file
/// from now on. Keeps the old one when the path cannot be opened.
pub fn reopen() -> std::io::Result<()> {
    let Some((logger, path)) = INSTALLED.get() else {
        return Ok(());
    };
    let file = open(path)?;
    if let Ok(mut current) = logger.file.lock() {
        *current = file;
    }
    Ok(())
}
