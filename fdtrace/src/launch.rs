//! Starting a command so it is traced from its first instruction.

use std::ffi::CString;

use anyhow::{Context as _, bail};

use crate::model::Pid;

/// A child forked and stopped before exec, so it can be traced from its first instruction.
pub struct StoppedChild {
    pub pid: Pid,
}

impl StoppedChild {
    pub fn release(&self) {
        // SAFETY: our own stopped child.
        unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
    }
}

/// Why a command cannot be run, as a shell reports it.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("No such file or directory")]
    NotFound,
    #[error("Permission denied")]
    NotExecutable,
}

impl CommandError {
    /// The shell's status for it: 127 not found, 126 found but not executable.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotFound => 127,
            Self::NotExecutable => 126,
        }
    }
}

/// Finds `command` as execvp would (a path when it has a slash, else a search of PATH), so
/// that a typo is one line and not a traced fdtrace child failing its exec.
pub fn check_command(command: &str) -> Result<(), CommandError> {
    use std::os::unix::fs::PermissionsExt as _;
    let runnable = |path: &std::path::Path| -> Result<(), CommandError> {
        let meta = std::fs::metadata(path).map_err(|_| CommandError::NotFound)?;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            Ok(())
        } else {
            Err(CommandError::NotExecutable)
        }
    };
    if command.contains('/') {
        return runnable(std::path::Path::new(command));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut found = Err(CommandError::NotFound);
    for dir in std::env::split_paths(&path) {
        match runnable(&dir.join(command)) {
            Ok(()) => return Ok(()),
            Err(CommandError::NotExecutable) => found = Err(CommandError::NotExecutable),
            Err(CommandError::NotFound) => {}
        }
    }
    found
}

/// Forks; the child closes every descriptor but stdio (so CMD gets nothing of fdtrace's),
/// stops itself, and execs CMD once the parent has added it to the traced set.
pub fn spawn_stopped(command: &[String]) -> anyhow::Result<StoppedChild> {
    crate::python::warm(&command[0]);
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()).context("an argument contains a NUL byte"))
        .collect::<anyhow::Result<_>>()?;
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let msg = format!("fdtrace: cannot run {}: ", command[0]);
    // SAFETY: the child only makes async-signal-safe calls before exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        // SAFETY: raw syscalls and exec in the forked child.
        unsafe {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            libc::raise(libc::SIGSTOP);
            libc::execvp(ptrs[0], ptrs.as_ptr());
            let err = *libc::__errno_location();
            let text = std::ffi::CStr::from_ptr(libc::strerror(err)).to_bytes();
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::write(2, text.as_ptr().cast(), text.len());
            libc::write(2, b"\n".as_ptr().cast(), 1);
            libc::_exit(127);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child to stop.
    let r = unsafe { libc::waitpid(pid, &raw mut status, libc::WUNTRACED) };
    if r != pid || !libc::WIFSTOPPED(status) {
        bail!("the command's process did not start");
    }
    Ok(StoppedChild { pid: pid as Pid })
}

/// The exit status as a shell reports it: the code, or 128 + the signal.
pub fn wait_exit(pid: Pid) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid as i32, &raw mut status, 0) };
        if r < 0 {
            return 1;
        }
        if libc::WIFEXITED(status) {
            return libc::WEXITSTATUS(status);
        }
        if libc::WIFSIGNALED(status) {
            return 128 + libc::WTERMSIG(status);
        }
    }
}
