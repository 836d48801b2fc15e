//! The e2e's 502 causes on nginx's side: fdtrace attached to nginx (`--pid` on the master,
//! `--follow` for its worker) while every request fails to reach the app, one cause per
//! scenario. fdtrace must name the cause, the peer, and count exactly what nginx's error.log
//! logs for it:
//! - app down: nothing listens on the upstream port (ECONNREFUSED, read with SO_ERROR);
//! - wrong port: uvicorn runs, on another port than nginx's upstream; fdtrace names it;
//! - unix socket with the wrong owner: uvicorn's socket only root may write, nginx's worker
//!   runs as nobody (EACCES);
//! - no socket: the unix socket path does not exist (ENOENT).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde::Deserialize;

use super::{Example, Service, Tracer, free_port, start_nginx, wait_for_port};

/// Requests per scenario: each one fails once upstream (`proxy_next_upstream off`).
const REQUESTS: u32 = 40;

/// The parts of fdtrace's JSON report these checks read.
#[derive(Deserialize)]
struct Report {
    upstream_failures: Vec<Upstream>,
}

#[derive(Deserialize, Debug)]
struct Upstream {
    pid: u32,
    peer: String,
    phase: String,
    cause: String,
    errno: String,
    count: u64,
    #[serde(default)]
    listening: Vec<String>,
}

struct Case {
    name: &'static str,
    /// nginx's `server` in its upstream block.
    upstream: String,
    /// The app to start first, if any: (port or unix socket, chmod of the socket after).
    app: Option<App>,
    cause: &'static str,
    errno: &'static str,
    /// What nginx's error.log says for each failure.
    logged: &'static str,
}

enum App {
    Port(u16),
    Socket(std::path::PathBuf),
}

impl Example {
    pub(super) fn upstream_scenarios(&self) -> anyhow::Result<()> {
        let root = self.root.join("upstream");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        // nginx's worker (nobody) must reach the sockets inside.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
        let (down, wrong, app_port) = (free_port()?, free_port()?, free_port()?);
        let owned = root.join("unix-owner").join("app.sock");
        let missing = root.join("no-socket").join("app.sock");
        let cases = [
            Case {
                name: "down",
                upstream: format!("127.0.0.1:{down}"),
                app: None,
                cause: "refused",
                errno: "ECONNREFUSED",
                logged: "(111: Connection refused) while connecting to upstream",
            },
            Case {
                name: "wrong-port",
                upstream: format!("127.0.0.1:{wrong}"),
                app: Some(App::Port(app_port)),
                cause: "refused",
                errno: "ECONNREFUSED",
                logged: "(111: Connection refused) while connecting to upstream",
            },
            Case {
                name: "unix-owner",
                upstream: format!("unix:{}", owned.display()),
                app: Some(App::Socket(owned.clone())),
                cause: "permission",
                errno: "EACCES",
                logged: "(13: Permission denied) while connecting to upstream",
            },
            Case {
                name: "no-socket",
                upstream: format!("unix:{}", missing.display()),
                app: None,
                cause: "no_socket",
                errno: "ENOENT",
                logged: "(2: No such file or directory) while connecting to upstream",
            },
        ];
        for case in cases {
            self.upstream_case(&root, &case)
                .with_context(|| format!("e2e upstream {} (see {})", case.name, root.display()))?;
        }
        Ok(())
    }

    fn upstream_case(&self, root: &std::path::Path, case: &Case) -> anyhow::Result<()> {
        let started = Instant::now();
        let dir = root.join(case.name);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let app = match &case.app {
            None => None,
            Some(kind) => {
                let mut command = Command::new("sh");
                command
                    .arg(self.sources.join("serve.sh"))
                    .env("PYTHON", &self.python)
                    .env("LEAK", "0");
                match kind {
                    App::Port(port) => command.env("PORT", port.to_string()),
                    App::Socket(path) => command.env("UDS", path),
                };
                let app = Service::start("uvicorn", &mut command, &dir.join("app.log"))?;
                app.wait_for_log("Application startup complete.", 1)?;
                if let App::Socket(path) = kind {
                    // uvicorn makes its socket writable by all; the mistake is a socket only
                    // its owner (root, here) may connect to, and nginx's worker is nobody.
                    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
                }
                Some(app)
            }
        };
        let nginx_port = free_port()?;
        let nginx = start_nginx(&self.sources, &dir, nginx_port, &case.upstream)?;
        wait_for_port(nginx_port, &nginx)?;
        let report_path = dir.join("report.json");
        let tracer = Tracer::start(
            Command::new(&self.fdtrace)
                .args(["--pid", &nginx.pid().to_string(), "--follow"])
                .args(["--no-tui", "--format", "json", "-o"])
                .arg(&report_path),
            &dir.join("fdtrace.log"),
        )?;
        let load = Command::new(&self.python)
            .arg(self.sources.join("load.py"))
            .args(["--port", &nginx_port.to_string()])
            .args(["--concurrency", "4", "--requests", &REQUESTS.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .context("running load.py")?;
        ensure!(load.status.success(), "load.py failed ({})", load.status);
        let load = String::from_utf8_lossy(&load.stdout).trim().to_string();
        thread::sleep(Duration::from_millis(300));
        tracer.stop()?;
        drop(nginx);
        drop(app);

        let errors = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        let logged = errors.lines().filter(|l| l.contains(case.logged)).count() as u64;
        ensure!(
            logged > 0,
            "nginx logged no {:?} (load: {load})",
            case.logged
        );
        let report: Report = serde_json::from_slice(&fs::read(&report_path)?)
            .with_context(|| format!("parsing {}", report_path.display()))?;
        let peer = case.upstream.clone();
        let named: Vec<&Upstream> = report
            .upstream_failures
            .iter()
            .filter(|u| u.peer == peer)
            .collect();
        let counted: u64 = named
            .iter()
            .filter(|u| u.cause == case.cause && u.errno == case.errno && u.phase == "connect")
            .map(|u| u.count)
            .sum();
        ensure!(
            counted == logged,
            "fdtrace counted {counted} {} connects to {peer}, nginx's error.log {logged}: {:?}",
            case.cause,
            report.upstream_failures
        );
        let log = fs::read_to_string(dir.join("fdtrace.log")).unwrap_or_default();
        let line = format!("connect to {peer} failed with {}", case.errno);
        ensure!(log.contains(&line), "fdtrace's live output lacks {line:?}");
        let mut hint = String::new();
        if let Some(App::Port(port)) = &case.app {
            let listener = format!("127.0.0.1:{port}");
            ensure!(
                named
                    .iter()
                    .any(|u| u.listening.iter().any(|l| l.starts_with(&listener))),
                "fdtrace did not name uvicorn's {listener} as listening: {named:?}"
            );
            hint = format!("; named the listener {listener}");
        }
        println!(
            "e2e upstream {}: ok in {:.1}s. nginx {} (pid {}): {logged} x {:?} in error.log, \
             fdtrace {counted} {} ({}) to {peer}{hint}. load: {load}",
            case.name,
            started.elapsed().as_secs_f64(),
            case.upstream,
            named.first().map_or(0, |u| u.pid),
            case.logged,
            case.cause,
            case.errno,
        );
        Ok(())
    }
}
