//! `cargo xtask demo`: fdtrace watching a server that leaks descriptors under a little load.
//!
//! The server runs in its own process group, so Ctrl-C reaches only fdtrace (and xtask, which
//! waits for fdtrace); when fdtrace exits, the load stops and the server is killed.

use std::{
    ffi::OsString,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{host_cargo, is_root, run_command, target_dir, toolchain};

const EXAMPLE: &str = "demo-server";
/// How long the server may take to print its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two requests of the load generator.
const REQUEST_INTERVAL: Duration = Duration::from_millis(200);

pub fn run(workspace: &Path, fdtrace_args: &[OsString]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF probes: run it as root (sudo -E cargo xtask demo)");
    }
    let source = workspace.join("fdtrace/examples");
    if !source.join(format!("{EXAMPLE}.rs")).exists()
        && !source.join(EXAMPLE).join("main.rs").exists()
    {
        bail!("the demo server fdtrace/examples/{EXAMPLE}.rs does not exist yet: nothing to trace");
    }
    toolchain::setup(workspace)?;
    run_command(
        host_cargo(workspace)
            .args(["build", "--release", "--package", "fdtrace", "--bins"])
            .args(["--example", EXAMPLE]),
    )?;
    let release = target_dir(workspace)?.join("release");

    install_signal_handlers()?;
    let log = release.join(format!("{EXAMPLE}.log"));
    let server = DemoServer::start(&release.join("examples").join(EXAMPLE), &log)?;
    let _load = LoadGenerator::start(server.addr);
    println!(
        "demo: {EXAMPLE} (pid {}) listens on {} under load; its output goes to {}",
        server.pid(),
        server.addr,
        log.display()
    );
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Ok(());
    }

    let fdtrace = release.join("fdtrace");
    let mut child = Command::new(&fdtrace)
        .arg("--pid")
        .arg(server.pid().to_string())
        .args(fdtrace_args)
        .spawn()
        .with_context(|| format!("starting {}", fdtrace.display()))?;
    FDTRACE_PID.store(child.id() as i32, Ordering::SeqCst);
    let status = child.wait().context("waiting for fdtrace");
    FDTRACE_PID.store(0, Ordering::SeqCst);
    let status = status?;
    // Ending on Ctrl-C or our SIGTERM is how a demo normally ends.
    let signalled = matches!(status.signal(), Some(libc::SIGINT | libc::SIGTERM));
    if !status.success() && !signalled {
        bail!("fdtrace exited with {status}");
    }
    Ok(())
}

/// Set by the signal handler: stop before starting fdtrace.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// fdtrace's pid while it runs, for forwarding SIGTERM and SIGHUP.
static FDTRACE_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // The terminal delivers SIGINT to fdtrace itself (same process group); other signals were
    // meant for the demo as a whole, so pass them on and let fdtrace end the demo.
    let pid = FDTRACE_PID.load(Ordering::SeqCst);
    if signal != libc::SIGINT && pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Keeps xtask alive through Ctrl-C so it can clean up once fdtrace exits. A handler (rather
/// than `SIG_IGN`) is reset by exec, so fdtrace still gets the default dispositions.
fn install_signal_handlers() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only touches atomics and calls kill.
        let result = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut())
        };
        if result != 0 {
            return Err(io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

/// The running demo server; killed when dropped.
struct DemoServer {
    child: Child,
    addr: SocketAddr,
}

impl DemoServer {
    fn start(binary: &Path, log: &Path) -> anyhow::Result<Self> {
        let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(binary)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file.try_clone().context("duplicating the log file")?)
            // Its own process group: Ctrl-C is for fdtrace, and we end the server afterwards.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("demo server has no stdout")?;
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        server.addr = read_address(stdout, log_file, log)?;
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `listening on 127.0.0.1:PORT` from the server's first line, then copies the rest of
/// its output to `log` in the background so it never blocks on a full pipe.
fn read_address(
    stdout: impl io::Read + Send + 'static,
    mut log_file: File,
    log: &Path,
) -> anyhow::Result<SocketAddr> {
    let (first_line, received) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let read = reader.read_line(&mut line).map(|_| line.clone());
        let _ = first_line.send(read);
        let _ = log_file.write_all(line.as_bytes());
        let _ = io::copy(&mut reader, &mut log_file);
    });
    let line = match received.recv_timeout(STARTUP_TIMEOUT) {
        Ok(Ok(line)) if !line.is_empty() => line,
        Ok(Ok(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            bail!(
                "{EXAMPLE} exited before printing its address (see {})",
                log.display()
            )
        }
        Ok(Err(err)) => return Err(err).context(format!("reading {EXAMPLE}'s output")),
        Err(mpsc::RecvTimeoutError::Timeout) => bail!(
            "{EXAMPLE} printed no address within {}s (see {})",
            STARTUP_TIMEOUT.as_secs(),
            log.display()
        ),
    };
    let line = line.trim();
    line.strip_prefix("listening on ")
        .and_then(|addr| addr.trim().parse().ok())
        .with_context(|| {
            format!("{EXAMPLE} printed {line:?} where `listening on 127.0.0.1:PORT` was expected")
        })
}

/// A thread sending a request to the server a few times per second until dropped.
struct LoadGenerator {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LoadGenerator {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    // Failures are part of the show: the server runs out of descriptors.
                    let _ = request(addr);
                    thread::sleep(REQUEST_INTERVAL);
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LoadGenerator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn request(addr: SocketAddr) -> io::Result<()> {
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    // One read is enough; a leaking server may never close its end.
    let mut response = [0; 1024];
    let _ = stream.read(&mut response)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn reads_the_address_from_the_first_line() {
        let log = PathBuf::from("/dev/null");
        let output = io::Cursor::new(b"listening on 127.0.0.1:4242\nmore\n".to_vec());
        let addr = read_address(output, File::create(&log).unwrap(), &log).unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], 4242)));
    }

    #[test]
    fn rejects_an_unexpected_first_line() {
        let log = PathBuf::from("/dev/null");
        let output = io::Cursor::new(b"hello\n".to_vec());
        let err = read_address(output, File::create(&log).unwrap(), &log).unwrap_err();
        assert!(format!("{err:#}").contains("listening on"), "{err:#}");
    }
}
