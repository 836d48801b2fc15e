//! `fdtrace serve` against a leaking process started after it: its metrics against the
//! process's own table in /proc, checked by promtool and scraped by a real Prometheus, and the
//! flight recording written when it hits EMFILE, read back. Root (loads the probes); promtool
//! and prometheus from Debian's prometheus package (`cargo xtask test` installs it).

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::KillOnDrop;
use serde_json::Value;

fn temp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET path`, or `None` while nothing answers.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}

/// The value of the sample of `metric` whose labels include every one of `labels`.
fn sample(metrics: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| set.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// Polls `check` every 200 ms until it answers or `within` passes.
fn wait_for<T>(within: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ground_truth(path: &Path, name: &str) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn slow() -> Duration {
    if common::emulated() {
        Duration::from_mins(2)
    } else {
        Duration::from_secs(20)
    }
}

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn serve_exports_a_process_started_later_and_records_its_emfile() {
    let bin = common::build_c("serve_target.c", &["-g", "-O1"]);
    let name = bin.file_name().unwrap().to_str().unwrap().to_string();
    let comm: String = name.chars().take(15).collect();
    let dir = temp("serve");
    let flight = dir.join("flight");
    let port = free_port();
    let serve_log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let mut serve = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_fdtrace"))
            .args(["serve", "--comm", &comm, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--flight-recorder")
            .arg(&flight)
            // Short, so that the recording is rebuilt from a keyframe: the fixture waits longer.
            .args(["--flight-seconds", "2"])
            .stdout(Stdio::null())
            .stderr(serve_log)
            .spawn()
            .unwrap(),
    );
    wait_for(slow(), "/healthz", || get(port, "/healthz"));

    // Started after serve: found at its exec.
    let (out, go) = (dir.join("truth"), dir.join("go"));
    let target = KillOnDrop(Command::new(&bin).arg(&out).arg(&go).spawn().unwrap());
    let pid = target.0.id();
    let pid_s = pid.to_string();
    wait_for(slow(), "the fixture's leaks", || {
        ground_truth(&out, "leaked")
    });
    // It waits now: its table holds still, and /metrics must come to say what /proc says.
    let truth = open_fds(pid);
    let me = [("pid", pid_s.as_str()), ("comm", comm.as_str())];
    let metrics = wait_for(slow(), "fdtrace_open_fds to match /proc", || {
        let m = get(port, "/metrics")?;
        (sample(&m, "fdtrace_open_fds", &me) == Some(truth as f64)).then_some(m)
    });
    assert_eq!(sample(&metrics, "fdtrace_fd_limit", &me), Some(64.0));
    let leak_line = common::marker_line("serve_target.c", "LEAK leak_config");
    let leak_site = format!("leak_config (serve_target.c:{leak_line})");
    assert_eq!(
        sample(
            &metrics,
            "fdtrace_site_open_fds",
            &[("pid", &pid_s), ("kind", "file"), ("site", &leak_site)]
        ),
        Some(20.0),
        "{metrics}"
    );
    // Its value needs a few one-second samples, which the fixture's second of leaks may not
    // have given yet.
    assert!(
        sample(&metrics, "fdtrace_fd_growth_per_minute", &me).is_some(),
        "{metrics}"
    );

    promtool_accepts(&metrics);

    if common::emulated() {
        println!("emulated: not starting Prometheus (promtool checked the exposition)");
    } else {
        scraped_by_prometheus(port, &dir, pid, truth);
    }

    // The go: it fills its table until openat fails with EMFILE.
    std::fs::write(&go, "").unwrap();
    let emfile_ns = wait_for(slow(), "the fixture's EMFILE", || {
        ground_truth(&out, "emfile_ns")
    }) as u64;
    assert_eq!(ground_truth(&out, "errno"), Some(i64::from(libc::EMFILE)));
    let filled = ground_truth(&out, "filled").unwrap() as u64;
    let failed = [
        ("pid", pid_s.as_str()),
        ("syscall", "openat"),
        ("errno", "EMFILE"),
    ];
    wait_for(slow(), "fdtrace_emfile_total", || {
        let m = get(port, "/metrics")?;
        (sample(&m, "fdtrace_emfile_total", &failed) == Some(1.0)).then_some(())
    });
    // Complete once the 10 s after the EMFILE have been recorded too.
    wait_for(
        slow() + Duration::from_secs(10),
        "the flight recording",
        || {
            let m = get(port, "/metrics")?;
            (m.contains("fdtrace_flight_recordings_total 1")).then_some(())
        },
    );
    let files: Vec<PathBuf> = std::fs::read_dir(&flight)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file_name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        file_name.starts_with(&format!("fdtrace-{comm}-{pid}-")),
        "{file_name}"
    );
    recording_holds_the_emfile(&files[0], pid, emfile_ns, filled);

    // Exited processes disappear from the metrics; serve goes on.
    drop(target);
    wait_for(slow(), "the exited process's series to go", || {
        let m = get(port, "/metrics")?;
        (!m.contains(&format!("pid=\"{pid}\""))).then_some(())
    });
    // SIGTERM: a clean stop.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.0.id() as i32, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(10), "serve to stop", || {
        serve.0.try_wait().unwrap()
    });
    assert!(
        status.success(),
        "serve exited with {status}: {}",
        std::fs::read_to_string(dir.join("serve.log")).unwrap()
    );
}

/// A real Prometheus scrapes serve and answers a PromQL query with what /proc says.
fn scraped_by_prometheus(port: u16, dir: &Path, pid: u32, truth: usize) {
    let prom_port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n  - job_name: fdtrace\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("running prometheus (Debian's prometheus package)"),
    );
    let query = format!("/api/v1/query?query=fdtrace_open_fds%7Bpid%3D%22{pid}%22%7D");
    let value = wait_for(Duration::from_mins(1), "Prometheus's answer", || {
        let body: Value = serde_json::from_str(&get(prom_port, &query)?).ok()?;
        let result = body["data"]["result"].as_array()?.first()?.clone();
        result["value"][1].as_str()?.parse::<f64>().ok()
    });
    assert_eq!(value as u64, truth as u64, "{value}");
}

/// `fdtrace report --format json` on the flight recording: the EMFILE at the fixture's own
/// time, blamed on the site that filled the table.
fn recording_holds_the_emfile(file: &Path, pid: u32, emfile_ns: u64, filled: u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_fdtrace"))
        .args(["report", "--format", "json"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let incidents = report["emfile"].as_array().unwrap();
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    let inc = &incidents[0];
    assert_eq!(inc["pid"], pid);
    assert_eq!(inc["syscall"], "openat");
    assert_eq!(inc["errno"], "EMFILE");
    // The fixture reads its clock just after the failure.
    let at = inc["mono_ns"].as_u64().unwrap();
    let slack = if common::emulated() { 1_000 } else { 50 } * 1_000_000;
    assert!(
        at <= emfile_ns && emfile_ns - at < slack,
        "incident at {at}, fixture saw it at {emfile_ns}"
    );
    let blamed = |function: &str| {
        inc["blame"].as_array().unwrap().iter().find_map(|b| {
            b["frames"]
                .as_array()?
                .iter()
                .any(|f| f["function"] == function)
                .then(|| b["open"].as_u64())?
        })
    };
    // From the keyframe (the leak, before the window's start) and from the window's events.
    assert_eq!(blamed("leak_config"), Some(20), "{inc}");
    assert_eq!(blamed("fill_table"), Some(filled), "{inc}");
    let first = &inc["blame"][0]["frames"];
    assert!(
        first
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["function"] == "fill_table"),
        "{inc}"
    );
}

/// `promtool check metrics`: the exposition parses, and follows Prometheus's naming rules.
fn promtool_accepts(metrics: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs root: loads eBPF programs"]
fn serve_refuses_bad_input_in_one_line() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let cases: [(&[&str], &str); 3] = [
        (&["serve"], "serve what?"),
        (&["serve", "--pid", "999999999"], "no process with pid"),
        (
            &[
                "serve",
                "--comm",
                "x",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ],
            "cannot listen on",
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_fdtrace"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// The README's alert rules (its `fdtrace-rules.yml` block) load in Prometheus.
#[test]
#[ignore = "needs promtool, which the root test run installs"]
fn readme_alert_rules_pass_promtool() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("# fdtrace-rules.yml\n")
        .expect("the README's rules block");
    let block = &readme[start..];
    let rules = &block[..block.find("```").unwrap()];
    let dir = temp("rules");
    let path = dir.join("fdtrace-rules.yml");
    std::fs::write(&path, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("running promtool (Debian's prometheus package)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
