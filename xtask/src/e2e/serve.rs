//! The e2e's monitoring scenario: `fdtrace serve --comm uvicorn` runs first, as the packaged
//! service would, and the leaking app starts behind nginx after it. Checks that /metrics says
//! what /proc says about uvicorn, that the accept4 EMFILE under load is counted and its flight
//! recording reads back with the leak blamed on app.py, and that a restarted uvicorn is picked
//! up again while the old one's series go.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{
    BACKLOG, CONCURRENCY, Example, NOFILE, REQUESTS, Report, Service, first_incident, free_port,
    open_count, place, start_nginx, wait_for_port,
};

/// How long serve may take to show what happened (it renders once a second; a flight
/// recording completes 10 s after its EMFILE).
const SETTLE: Duration = Duration::from_secs(30);

impl Example {
    pub(super) fn serve_scenario(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let dir = self.root.join("serve");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let (metrics_port, app_port, nginx_port) = (free_port()?, free_port()?, free_port()?);
        let flight = dir.join("flight");

        // Before any uvicorn runs: it must pick them up as they start.
        let serve = Service::start(
            "fdtrace serve",
            Command::new(&self.fdtrace)
                .args(["serve", "--comm", "uvicorn", "--listen"])
                .arg(format!("127.0.0.1:{metrics_port}"))
                .arg("--flight-recorder")
                .arg(&flight)
                .args(["--flight-seconds", "10"]),
            &dir.join("serve.log"),
        )?;
        wait_for(SETTLE, "serve's /healthz", || {
            serve.ensure_running()?;
            Ok(get(metrics_port, "/healthz").is_some())
        })?;

        let nginx = start_nginx(
            &self.sources,
            &dir,
            nginx_port,
            &format!("127.0.0.1:{app_port}"),
        )?;
        let app = self.start_uvicorn(&dir, app_port, "app.log")?;
        wait_for_port(nginx_port, &nginx)?;
        let pid = app.pid();
        let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
        ensure!(
            comm.trim() == "uvicorn",
            "the app runs as {comm:?}, not uvicorn"
        );
        // Idle: its table holds still, and /metrics must come to say what /proc says.
        let truth = open_count(pid);
        wait_for(
            SETTLE,
            &format!("fdtrace_open_fds of {pid} = {truth}"),
            || Ok(open_fds(metrics_port, pid) == Some(truth)),
        )?;
        let metrics = get(metrics_port, "/metrics").context("no /metrics")?;
        ensure!(
            sample(&metrics, "fdtrace_fd_limit", &[("pid", &pid.to_string())])
                == Some(NOFILE as f64),
            "fdtrace_fd_limit is not {NOFILE}:\n{metrics}"
        );

        let load = Command::new(&self.python)
            .arg(self.sources.join("load.py"))
            .args(["--port", &nginx_port.to_string()])
            .args(["--concurrency", &CONCURRENCY.to_string()])
            .args(["--requests", &REQUESTS.to_string()])
            .args(["--stop-after-5xx", "1", "--max-seconds", "60"])
            .stderr(Stdio::inherit())
            .output()
            .context("running load.py")?;
        ensure!(load.status.success(), "load.py failed ({})", load.status);
        let failed = [
            ("pid", pid.to_string()),
            ("syscall", "accept4".to_string()),
            ("errno", "EMFILE".to_string()),
        ];
        let failed: Vec<(&str, &str)> = failed.iter().map(|(k, v)| (*k, v.as_str())).collect();
        wait_for(SETTLE, "fdtrace_emfile_total for accept4", || {
            let m = get(metrics_port, "/metrics").unwrap_or_default();
            Ok(sample(&m, "fdtrace_emfile_total", &failed).is_some_and(|n| n >= 1.0))
        })?;
        wait_for(SETTLE, "the flight recording", || {
            let m = get(metrics_port, "/metrics").unwrap_or_default();
            Ok(sample(&m, "fdtrace_flight_recordings_total", &[]).is_some_and(|n| n >= 1.0))
        })?;
        let recording = fs::read_dir(&flight)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("fdtrace-uvicorn-{pid}-")))
            })
            .with_context(|| format!("no flight recording of {pid} in {}", flight.display()))?;
        let blamed = self.check_recording(&recording, pid)?;
        // After the load the leak stays: what /proc says is again what /metrics says.
        let truth = open_count(pid);
        wait_for(
            SETTLE,
            &format!("fdtrace_open_fds of {pid} = {truth} after the load"),
            || Ok(open_fds(metrics_port, pid) == Some(truth)),
        )?;

        // A restart: the old process's series go, the new one's come.
        drop(app);
        let again = self.start_uvicorn(&dir, app_port, "app-again.log")?;
        let new_pid = again.pid();
        wait_for(
            SETTLE,
            &format!("the restarted uvicorn {new_pid} in /metrics"),
            || {
                let m = get(metrics_port, "/metrics").unwrap_or_default();
                Ok(!m.contains(&format!("pid=\"{pid}\""))
                    && open_fds(metrics_port, new_pid) == Some(open_count(new_pid)))
            },
        )?;
        drop(again);
        drop(nginx);
        // SIGTERM: a clean stop, status 0.
        let status = serve.terminate()?;
        ensure!(status.success(), "serve exited with {status}");
        println!(
            "e2e serve: ok in {:.1}s. uvicorn {pid} under `serve --comm uvicorn`: /metrics = /proc \
             ({truth} open), accept4 EMFILE counted, flight recording {} blames {blamed}; \
             restarted as {new_pid} and picked up",
            started.elapsed().as_secs_f64(),
            recording.display()
        );
        Ok(())
    }

    fn start_uvicorn(&self, dir: &Path, port: u16, log: &str) -> anyhow::Result<Service> {
        let app = Service::start(
            "uvicorn",
            Command::new("sh")
                .arg(self.sources.join("serve.sh"))
                .env("ENTRY", "script")
                .env("PYTHON", &self.python)
                .env("PORT", port.to_string())
                .env("NOFILE", NOFILE.to_string())
                .env("BACKLOG", BACKLOG.to_string())
                .env("LEAK", "1"),
            &dir.join(log),
        )?;
        app.wait_for_log("Application startup complete.", 1)?;
        Ok(app)
    }

    /// `fdtrace report --format json` on the flight recording: the accept4 EMFILE of `pid`,
    /// with the leaked files on top of its blame, named by app.py's line. Returns the place.
    fn check_recording(&self, recording: &PathBuf, pid: u32) -> anyhow::Result<String> {
        let out = Command::new(&self.fdtrace)
            .args(["report", "--format", "json"])
            .arg(recording)
            .output()?;
        ensure!(
            out.status.success(),
            "fdtrace report {}: {}",
            recording.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Report = serde_json::from_slice(&out.stdout)?;
        let accept = first_incident(&report, pid, "accept4")
            .context("the flight recording has no accept4 EMFILE")?;
        let top = accept.blame.first().context("no blame")?;
        let in_app = top
            .frames
            .iter()
            .any(|f| f.file.as_deref() == Some("app.py"));
        ensure!(
            top.kind == "file" && in_app,
            "the top of the recorded blame is {} {} at {}, not the app.py leak",
            top.open,
            top.kind,
            place(&top.frames)
        );
        Ok(format!("{} files at app.py", top.open))
    }
}

impl Service {
    /// SIGTERM, and its exit status within 10 s.
    fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: signalling a process we started.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_for(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !check()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The body of `GET path`, when it answers 200.
pub(crate) fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.split_whitespace()
        .nth(1)
        .is_some_and(|code| code == "200")
        .then(|| body.to_string())
}

/// The value of the first sample of `metric` whose labels include all of `labels`.
pub(crate) fn sample(metrics: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?;
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| set.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

fn open_fds(port: u16, pid: u32) -> Option<u64> {
    let m = get(port, "/metrics")?;
    sample(&m, "fdtrace_open_fds", &[("pid", &pid.to_string())]).map(|v| v as u64)
}
