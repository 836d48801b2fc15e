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

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Compiles `tests/fixtures/<source>` with gcc and `flags` into the test target directory,
/// once per set of flags; returns the binary.
pub fn build_c(source: &str, flags: &[&str]) -> PathBuf {
    let src = fixture_dir().join(source);
    let tag: String = flags
        .concat()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("{}-{tag}", source.trim_end_matches(".c")));
    let status = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("running gcc");
    assert!(status.success(), "gcc failed on {}", src.display());
    out
}

/// Compiles `tests/fixtures/<source>` with rustc -O, without frame pointers.
pub fn build_rust(source: &str) -> PathBuf {
    let src = fixture_dir().join(source);
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(source.trim_end_matches(".rs"));
    let status = Command::new("rustc")
        .args([
            "-O",
            "-g",
            "-C",
            "force-frame-pointers=no",
            "--edition",
            "2024",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .env_remove("RUSTFLAGS")
        .status()
        .expect("running rustc");
    assert!(status.success(), "rustc failed on {}", src.display());
    out
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
    let deadline = Instant::now() + Duration::from_mins(1);
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
