//! Selecting processes by name, cgroup and container (`--comm`, `--cgroup`, `--container`),
//! including processes that start after fdtrace: the real binary and probes against a fixture
//! that reports its own /proc/self/fd.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::KillOnDrop;
use serde_json::Value;

/// Files the fixture leaks.
const LEAKED: usize = 5;

fn fixture() -> PathBuf {
    common::build_c("select_target.c", &["-O2", "-g"])
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fdtrace-select-{name}-{}", std::process::id()))
}

/// The fixture's /proc/self/fd listing: descriptor → link.
fn read_listing(listing: &Path) -> BTreeMap<u64, String> {
    let text = fs::read_to_string(listing)
        .unwrap_or_else(|e| panic!("reading {}: {e}", listing.display()));
    let _ = fs::remove_file(listing);
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(fd, link)| (fd.parse().unwrap(), link.to_string()))
        .collect()
}

/// The descriptors a listing shows open on /etc/hostname: the fixture's leaks.
fn leaked_fds(listing: &BTreeMap<u64, String>) -> BTreeSet<u64> {
    listing
        .iter()
        .filter(|(_, link)| *link == "/etc/hostname")
        .map(|(&fd, _)| fd)
        .collect()
}

/// fdtrace started with `args`, writing a JSON report to `out` at SIGINT; and the first line
/// it printed.
fn start_fdtrace(args: &[&str], out: &Path) -> (KillOnDrop, String) {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_fdtrace"))
            .args(args)
            .args(["--no-tui", "--format", "json", "-o"])
            .arg(out)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    // The rest of its standard error, for the failure messages, without blocking it.
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("fdtrace: {line}");
        }
    });
    (child, line)
}

/// Stops fdtrace as Ctrl-C does, once it has had time to consume what the probes wrote, and
/// returns its report.
fn stop_fdtrace(mut tracer: KillOnDrop, out: &Path) -> Value {
    std::thread::sleep(Duration::from_millis(if common::emulated() {
        3000
    } else {
        700
    }));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.0.id() as i32, libc::SIGINT) };
    let status = tracer.0.wait().unwrap();
    assert!(status.success(), "fdtrace: {status}");
    let report = serde_json::from_slice(&fs::read(out).unwrap()).unwrap();
    let _ = fs::remove_file(out);
    report
}

fn process(report: &Value, pid: u32) -> &Value {
    report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} is not in the report: {:#}", report["processes"]))
}

/// The fixture's leaks are one site of `pid`, created in `leak_files`, on the descriptors its
/// listing showed.
fn assert_leaks_attributed(report: &Value, pid: u32, listing: &BTreeMap<u64, String>) {
    let truth = leaked_fds(listing);
    assert_eq!(truth.len(), LEAKED, "the fixture's listing: {truth:?}");
    let site = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["pid"] == pid
                && s["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["function"] == "leak_files")
        })
        .unwrap_or_else(|| panic!("no site of {pid} in leak_files: {:#}", report["sites"]));
    assert_eq!(site["kind"], "file");
    assert_eq!(site["inherited"], false);
    assert_eq!(site["targets"], serde_json::json!(["/etc/hostname"]));
    let fds: BTreeSet<u64> = site["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_u64().unwrap())
        .collect();
    assert_eq!(fds, truth, "the site's descriptors are the fixture's leaks");
    assert_eq!(site["open"], LEAKED as u64);
}

/// How long the fixture stays alive after its leaks: long enough for fdtrace to find it in
/// /proc after its exec record (tens of milliseconds here; an emulated guest is far slower).
fn stay_ms() -> &'static str {
    if common::emulated() { "3000" } else { "400" }
}

fn run_fixture(bin: &Path, listing: &Path) -> u32 {
    let mut child = Command::new(bin)
        .arg(listing)
        .arg(LEAKED.to_string())
        .arg(stay_ms())
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(child.wait().unwrap().success(), "the fixture failed");
    pid
}

#[test]
#[ignore = "root"]
fn comm_picks_up_processes_that_start_later_and_again() {
    // A name no other process has, at most 15 bytes so that the kernel keeps it whole.
    let name = format!("fdtsel{}", std::process::id() % 1_000_000);
    let dir = temp("comm");
    fs::create_dir_all(&dir).unwrap();
    let bin = dir.join(&name);
    fs::copy(fixture(), &bin).unwrap();
    let out = dir.join("report.json");

    let (tracer, first) = start_fdtrace(&["--comm", &name], &out);
    assert!(
        first.contains(&format!("waiting for processes matching comm {name}")),
        "{first}"
    );
    // Started after fdtrace, twice: a service restarted.
    let listings = [dir.join("listing-1"), dir.join("listing-2")];
    let pids: Vec<u32> = listings
        .iter()
        .map(|listing| run_fixture(&bin, listing))
        .collect();
    let report = stop_fdtrace(tracer, &out);
    let listings: Vec<BTreeMap<u64, String>> = listings.iter().map(|l| read_listing(l)).collect();
    let _ = fs::remove_dir_all(&dir);

    for (&pid, listing) in pids.iter().zip(&listings) {
        let p = process(&report, pid);
        assert_eq!(p["comm"], name.as_str());
        // Read from its /proc when its exec was seen, as for --pid.
        assert_eq!(p["ppid"], std::process::id(), "{p}");
        assert!(p["limit"]["soft"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["open_at_end"], listing.len() as u64, "{p}: {listing:?}");
        assert_leaks_attributed(&report, pid, listing);
    }
    assert_eq!(report["dropped_events"], 0);
}

/// A cgroup v2 directory for the test, removed (with its children) when dropped.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> Self {
        let root = fdtrace::select::cgroup2_root().expect("a cgroup v2 mount");
        let dir = root.join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self(dir)
    }

    fn child(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        fs::create_dir(&dir).unwrap();
        dir
    }

    /// Moves process `pid` into the cgroup `dir`.
    fn enter(dir: &Path, pid: u32) {
        fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
    }

    fn relative(&self) -> String {
        self.0.file_name().unwrap().to_str().unwrap().to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Deepest first; a cgroup with processes left cannot go, which the test would have
        // reported already.
        let mut dirs = vec![self.0.clone()];
        if let Ok(entries) = fs::read_dir(&self.0) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        for dir in dirs.iter().rev() {
            if let Err(e) = fs::remove_dir(dir) {
                eprintln!("removing {}: {e}", dir.display());
            }
        }
    }
}

/// A shell that waits for a line on its standard input, then becomes `argv`.
fn held_exec(argv: &[&str]) -> Child {
    let script = format!("read go; exec {}", argv.join(" "));
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

fn release(child: &mut Child) {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
}

/// The leaking fixture started inside cgroup directory `dir` from its first instruction
/// (held in a shell until moved there), writing its table to `listing` and staying `stay_ms`.
fn fixture_in(dir: &Path, listing: &Path, stay_ms: &str) -> (PathBuf, Child) {
    let bin = fixture();
    let leaked = LEAKED.to_string();
    let mut shell = held_exec(&[
        bin.to_str().unwrap(),
        listing.to_str().unwrap(),
        &leaked,
        stay_ms,
    ]);
    TestCgroup::enter(dir, shell.id());
    release(&mut shell);
    (bin, shell)
}

#[test]
#[ignore = "root"]
fn cgroup_picks_up_processes_that_start_below_it_later() {
    let cgroup = TestCgroup::new(&format!("fdtrace-test-{}", std::process::id()));
    // The process goes into a cgroup below the selected one: matched by its ancestor.
    let leaf = cgroup.child("leaf");
    let listing = temp("cgroup-listing");
    let out = temp("cgroup-report.json");

    let (tracer, first) = start_fdtrace(&["--cgroup", &cgroup.relative()], &out);
    assert!(
        first.contains(&format!(
            "waiting for processes matching cgroup {}",
            cgroup.relative()
        )),
        "{first}"
    );
    let (bin, mut shell) = fixture_in(&leaf, &listing, stay_ms());
    let pid = shell.id();
    assert!(shell.wait().unwrap().success(), "the fixture failed");
    let report = stop_fdtrace(tracer, &out);

    let listing = read_listing(&listing);
    let p = process(&report, pid);
    let name = bin.file_name().unwrap().to_str().unwrap();
    assert_eq!(p["comm"], name[..name.len().min(15)]);
    assert_eq!(p["open_at_end"], listing.len() as u64, "{p}: {listing:?}");
    assert_leaks_attributed(&report, pid, &listing);
    assert_eq!(report["dropped_events"], 0);
    drop(cgroup);
}

#[test]
#[ignore = "root"]
fn container_selects_processes_running_in_it_already() {
    // A cgroup named as docker names a container's under systemd, with an id of our own.
    let seed = format!(
        "{:08x}{:08x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let id = seed.repeat(4);
    let cgroup = TestCgroup::new(&format!("docker-{id}.scope"));
    let listing = temp("container-listing");
    let out = temp("container-report.json");

    // Running, its leaks made, before fdtrace starts.
    let (_, shell) = fixture_in(&cgroup.0, &listing, "60000");
    let pid = shell.id();
    let shell = KillOnDrop(shell);
    for _ in 0..200 {
        if listing.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));

    let (tracer, first) = start_fdtrace(&["--container", &id[..12]], &out);
    assert!(first.contains(&format!("tracing pid {pid} (")), "{first}");
    assert!(
        first.contains(&format!(
            "processes matching container {} (docker-{id}.scope)",
            &id[..12]
        )),
        "{first}"
    );
    let report = stop_fdtrace(tracer, &out);
    // Reaped before its cgroup goes.
    drop(shell);

    // Open before tracing began: inherited sites hold them, with no frames.
    let truth = leaked_fds(&read_listing(&listing));
    assert_eq!(truth.len(), LEAKED);
    let held: BTreeSet<u64> = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["pid"] == pid && s["inherited"] == true && s["kind"] == "file")
        .flat_map(|s| s["fds"].as_array().unwrap().clone())
        .map(|f| f.as_u64().unwrap())
        .collect();
    assert!(
        truth.is_subset(&held),
        "leaks {truth:?}, inherited sites hold {held:?}"
    );
    process(&report, pid);
    drop(cgroup);
}

#[test]
fn bad_selectors_get_one_line_and_a_nonzero_exit() {
    for (args, says) in [
        (&["--comm", ""][..], "--comm \"\""),
        (&["--comm", "/usr/bin/x"][..], "no '/'"),
        (
            &["--cgroup", "fdtrace-no-such-cgroup"][..],
            "no such cgroup",
        ),
        (&["--cgroup", "/"][..], "root cgroup"),
        (&["--container", "abc"][..], "at least 4 hex digits"),
        (&["--container", "fdfdfdfdfd"][..], "no container cgroup"),
        (
            &["record", "--comm", "x", "-o", "/dev/null", "--", "true"][..],
            "not both",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fdtrace"))
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("fdtrace: "), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
