//! Shared by the root integration tests: building fixtures and running them traced.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use fdtrace::{
    launch,
    model::{Event, Pid},
    probe::ProbeOptions,
    session::Session,
};

/// Whether the tests run in an emulated guest (`cargo xtask vm-test` sets FDTRACE_EMULATED=1),
/// where wall-clock bounds do not hold.
pub fn emulated() -> bool {
    std::env::var_os("FDTRACE_EMULATED").is_some_and(|v| v == "1")
}

/// `FDTRACE_LEARN_MS=N` for fixtures that pause after their first creation so that fdtrace
/// learns its call site (`tests/fixtures/learn.h`): 2 s, or 30 s in an emulated guest, where
/// the first unwind of a debug build takes seconds. (300 ms and 8 s were enough until a day
/// this VM ran several times slower, 2026-12-07: the debug build then learned after about a
/// second here, and 6.1's guest failed the kept-descriptor test.) Passed through `env`,
/// before the fixture.
pub fn learn_env() -> String {
    format!(
        "FDTRACE_LEARN_MS={}",
        if emulated() { 30_000 } else { 2000 }
    )
}

/// How long a traced command may take before the test gives up: a minute, or ten in an
/// emulated guest, which runs several times slower (300 short children took over a minute).
pub fn run_deadline() -> Instant {
    if emulated() {
        println!("emulated: a traced run may take 10 min, not 1");
        Instant::now() + Duration::from_mins(10)
    } else {
        Instant::now() + Duration::from_mins(1)
    }
}

/// The line of `tests/fixtures/<file>` holding `marker` (the fixtures mark the lines tests
/// expect in reports).
pub fn marker_line(file: &str, marker: &str) -> u32 {
    let text = std::fs::read_to_string(fixture_dir().join(file)).unwrap();
    let index = text
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("{marker} not in {file}"));
    index as u32 + 1
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Whether `out` was built after every fixture source and header last changed: then it is
/// not built again. The kernel matrix's guests (`cargo xtask vm-test`) get the host's builds
/// this way: gcc and rustc under TCG take minutes (the attribution binary was killed at its
/// 600 s while compiling a Rust fixture, on a slow day; with the host's builds it took 620 s).
fn up_to_date(out: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(out) else {
        return false;
    };
    std::fs::read_dir(fixture_dir())
        .into_iter()
        .flatten()
        .flatten()
        .all(|entry| modified(&entry.path()).is_some_and(|changed| changed <= built))
}

/// Runs `compiler` (its arguments given, but not the output) to build `out` unless it is up
/// to date. It writes a file of its own, renamed over `out` when done, so a test running the
/// binary never sees it half written.
fn build(mut compiler: Command, out: &Path, src: &Path) -> PathBuf {
    if up_to_date(out) {
        return out.to_path_buf();
    }
    let partial = out.with_extension(format!(
        "partial-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let status = compiler
        .arg("-o")
        .arg(&partial)
        .arg(src)
        .status()
        .expect("running the compiler");
    assert!(status.success(), "compiling {} failed", src.display());
    std::fs::rename(&partial, out).unwrap();
    out.to_path_buf()
}

fn fixtures_out() -> PathBuf {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&out_dir).unwrap();
    out_dir
}

/// Compiles `tests/fixtures/<source>` with gcc and `flags` into the test target directory,
/// once per set of flags; returns the binary.
pub fn build_c(source: &str, flags: &[&str]) -> PathBuf {
    let tag: String = flags
        .concat()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let out = fixtures_out().join(format!("{}-{tag}", source.trim_end_matches(".c")));
    let mut gcc = Command::new("gcc");
    gcc.args(flags);
    build(gcc, &out, &fixture_dir().join(source))
}

/// Compiles `tests/fixtures/<source>` with rustc -O, without frame pointers.
pub fn build_rust(source: &str) -> PathBuf {
    let out = fixtures_out().join(source.trim_end_matches(".rs"));
    let mut rustc = Command::new("rustc");
    rustc
        .args([
            "-O",
            "-g",
            "-C",
            "force-frame-pointers=no",
            "--edition",
            "2024",
        ])
        .env_remove("RUSTFLAGS");
    build(rustc, &out, &fixture_dir().join(source))
}

/// A command run to completion under a live session.
pub struct TracedRun {
    pub session: Session,
    pub pid: Pid,
    pub events: Vec<Event>,
    pub exit_code: i32,
}

/// Runs `argv` traced from its first instruction (as `fdtrace run` does) until it exits.
pub fn run_traced(argv: &[&str], options: ProbeOptions) -> TracedRun {
    let mut session = Session::start(options).expect("loading the probes (are we root?)");
    let argv: Vec<String> = argv.iter().map(ToString::to_string).collect();
    let child = launch::spawn_stopped(&argv).unwrap();
    let pid = child.pid;
    session.watch_mappings(pid).unwrap();
    session.add(pid).unwrap();
    child.release();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(launch::wait_exit(pid)));
    let mut events = Vec::new();
    let deadline = run_deadline();
    let mut exit_code = None;
    loop {
        events.extend(session.pump(Duration::from_millis(20)));
        if exit_code.is_none() {
            exit_code = rx.try_recv().ok();
        }
        let exited = session
            .model
            .processes
            .get(&pid)
            .is_some_and(|p| !p.alive());
        if exited && exit_code.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "{argv:?} did not finish in time");
    }
    let exit_code = exit_code.unwrap();
    session.set_exit_code(pid, exit_code);
    TracedRun {
        session,
        pid,
        events,
        exit_code,
    }
}

/// Kills and reaps a child however the test ends, so no server outlives it.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The leaking demo server (an example `cargo test` builds), started; and its port.
pub fn start_demo_server() -> (KillOnDrop, u16) {
    use std::io::{BufRead as _, BufReader};
    let bin = Path::new(env!("CARGO_BIN_EXE_fdtrace"));
    let dir = bin.parent().unwrap();
    let path = [
        dir.join("examples/demo-server"),
        dir.join("../examples/demo-server"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("the demo-server example is built by cargo test");
    let mut server = KillOnDrop(
        Command::new(path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(server.0.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let port = first.trim().rsplit(':').next().unwrap().parse().unwrap();
    (server, port)
}

/// One HTTP request; `false` when the server did not answer (its accept is failing).
pub fn request(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.0 200")
}
