//! Processes in containers, attached from the host by their host pid: their code is named
//! (read through their own root, not the host's paths) and their pid as they see it is
//! reported. The "container" is what one is to the kernel: its own pid and mount namespaces,
//! the program on a tmpfs that only its mount namespace sees. (No image registry is reachable
//! here, and a runtime adds nothing the kernel would see differently.)

mod common;

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use fdtrace::{
    clock::monotonic_ns,
    model::{FdKind, Pid},
    probe::ProbeOptions,
    report::{FrameReport, Report, SiteReport},
    session::Session,
    stack::Lang,
};

use common::marker_line;

/// A program running in its own pid and mount namespaces, from a directory that is empty on
/// the host and a private tmpfs inside.
struct Container {
    _unshare: common::KillOnDrop,
    /// The program's pid on the host.
    pid: Pid,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    app_dir: PathBuf,
}

impl Container {
    /// Copies `files` into the container's private `/…/app` directory and runs `argv` there
    /// (`{app}` in an argument stands for that directory).
    fn start(name: &str, files: &[&Path], argv: &[&str]) -> Self {
        let app_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("container-{name}/app"));
        fs::create_dir_all(&app_dir).unwrap();
        let app = app_dir.to_str().unwrap();
        let copies: Vec<String> = files
            .iter()
            .map(|f| format!("cp {} {app}/ && ", f.display()))
            .collect();
        let argv: Vec<String> = argv.iter().map(|a| a.replace("{app}", app)).collect();
        let script = format!(
            "mount -t tmpfs app {app} && {} exec {}",
            copies.concat(),
            argv.join(" ")
        );
        let mut unshare = Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--propagation", "private"])
            .args(["sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running unshare");
        let stdin = unshare.stdin.take();
        let stdout = BufReader::new(unshare.stdout.take().unwrap());
        let unshare_pid = unshare.id();
        let unshare = common::KillOnDrop(unshare);
        // The program is unshare's child once it has exec'd (its command line names the app).
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = loop {
            let found = fdtrace::procfs::children(unshare_pid)
                .into_iter()
                .find(|&child| {
                    fs::read(format!("/proc/{child}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&argv[argv.len() - 1]))
                });
            if let Some(pid) = found {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "{script}: the program did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Self {
            _unshare: unshare,
            pid,
            stdin,
            stdout,
            app_dir,
        }
    }

    /// Tells the program to leak; returns what it printed about itself, up to "ready".
    fn leak(&mut self) -> Vec<String> {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "the program ended early: {lines:?}"
            );
            if line.trim() == "ready" {
                return lines;
            }
            lines.push(line.trim().to_string());
        }
    }

    /// Lets the program exit (it waits for the end of its input).
    fn stop(&mut self) {
        self.stdin = None;
    }
}

/// Attaches to the container's program, has it leak, and reports once it has exited; also
/// returns what the program said about itself.
fn trace(container: &mut Container) -> (Report, Vec<String>) {
    let mut session = Session::start(ProbeOptions::default()).expect("loading the probes");
    session.add(container.pid).unwrap();
    session.pump(Duration::from_millis(10));
    let truth = container.leak();
    // Every record written before the program said "ready" reaches the model.
    let said = monotonic_ns();
    let deadline = common::run_deadline();
    while session.drained_until() < said {
        session.pump(Duration::from_millis(20));
        assert!(Instant::now() < deadline, "the session did not catch up");
    }
    session.pump(Duration::from_millis(20));
    let report = session.report();
    container.stop();
    (report, truth)
}

/// The pid the program printed as its own (`getpid: N`): the one in its pid namespace.
fn said_pid(truth: &[String]) -> u64 {
    truth
        .iter()
        .find_map(|l| l.strip_prefix("getpid: "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no getpid line in {truth:?}"))
}

/// The JSON report's entry for `pid`, as consumers read it.
fn process_json(report: &Report, pid: Pid) -> serde_json::Value {
    let json = serde_json::to_value(report).unwrap();
    json["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("no process {pid} in {json:#}"))
        .clone()
}

/// The container's site whose stack runs through `open_settings`, which must hold the 5
/// descriptors the program leaked there, and that frame.
fn open_settings_site(report: &Report, pid: Pid) -> (&SiteReport, &FrameReport) {
    let site = report
        .sites
        .iter()
        .filter(|s| s.pid == pid && s.kind == FdKind::File)
        .find(|s| {
            s.frames
                .iter()
                .any(|f| f.function.as_deref() == Some("open_settings"))
        })
        .unwrap_or_else(|| panic!("no site in open_settings: {:#?}", report.sites));
    assert_eq!(site.open, 5);
    let frame = site
        .frames
        .iter()
        .find(|f| f.function.as_deref() == Some("open_settings"))
        .unwrap();
    (site, frame)
}

#[test]
#[ignore = "root"]
fn a_containers_c_program_is_named_from_its_own_files() {
    let program = common::build_c("container_app.c", &["-O2", "-g"]);
    let mut container = Container::start("c", &[&program], &["{app}/container_app-O2g"]);
    // The host does not see the program: only the container's tmpfs holds it.
    assert!(
        !container.app_dir.join("container_app-O2g").exists(),
        "the app directory is visible on the host"
    );
    let (report, truth) = trace(&mut container);
    let ns_pid = said_pid(&truth);
    let host_view = truth
        .iter()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or_else(|| panic!("no NSpid line in {truth:?}"));
    assert_eq!(
        host_view.split_whitespace().collect::<Vec<_>>(),
        ["NSpid:", &container.pid.to_string(), &ns_pid.to_string()],
        "the test attached to another process than the program"
    );

    let (site, frame) = open_settings_site(&report, container.pid);
    assert_eq!(frame.file.as_deref(), Some("container_app.c"));
    assert_eq!(
        frame.line,
        Some(marker_line("container_app.c", "LEAK open_settings"))
    );
    assert!(
        site.frames
            .iter()
            .any(|f| f.function.as_deref() == Some("main")),
        "{:#?}",
        site.frames
    );

    let process = process_json(&report, container.pid);
    assert_eq!(process["ns_pid"], ns_pid, "{process:#}");
}

#[test]
#[ignore = "root"]
fn a_containers_python_app_gets_python_frames() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/container_app.py");
    let python = "/usr/bin/python3";
    let mut container =
        Container::start("py", &[&script], &[python, "-u", "{app}/container_app.py"]);
    let (report, truth) = trace(&mut container);
    let ns_pid = said_pid(&truth);
    assert_ne!(
        u64::from(container.pid),
        ns_pid,
        "not in its own pid namespace"
    );

    let (_, frame) = open_settings_site(&report, container.pid);
    assert_eq!(frame.lang, Lang::Python);
    assert_eq!(frame.file.as_deref(), Some("container_app.py"));
    assert_eq!(
        frame.line,
        Some(marker_line("container_app.py", "LEAK open_settings"))
    );

    let process = process_json(&report, container.pid);
    assert_eq!(process["ns_pid"], ns_pid, "{process:#}");
}
