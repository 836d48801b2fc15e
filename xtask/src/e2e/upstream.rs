//! The e2e's 502 causes on nginx's side: fdtrace attached to nginx (`--pid` on the master,
//! `--follow` for its worker) while every request fails to reach the app, one cause per
//! scenario. fdtrace must name the cause, the peer, and count exactly what nginx's error.log
//! logs for it:
//! - app down: nothing listens on the upstream port (ECONNREFUSED, read with SO_ERROR);
//! - wrong port: uvicorn runs, on another port than nginx's upstream; fdtrace names it;
//! - unix socket with the wrong owner: uvicorn's socket only root may write, nginx's worker
//!   runs as nobody (EACCES);
//! - no socket: the unix socket path does not exist (ENOENT);
//! - backlog full: uvicorn with a backlog of 2 blocks its event loop in a handler, the kernel
//!   drops the SYNs past its full accept queue, nginx's connects time out (504); the requests
//!   that did get in time out waiting for their answer;
//! - timeout mismatch: the app answers in 2 s, nginx's proxy_read_timeout is 1s (504); fdtrace
//!   reads nginx's configuration (`nginx -T`) and names the directive.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde::Deserialize;

use super::{Example, Service, Tracer, free_port, start_nginx_with, wait_for_port};

/// Requests per scenario, unless it says otherwise: each one fails once upstream
/// (`proxy_next_upstream off`).
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
    #[serde(default)]
    nginx_timeout: Option<String>,
    #[serde(default)]
    at_nginx_timeout: bool,
}

struct Case {
    name: &'static str,
    /// nginx's `server` in its upstream block.
    upstream: String,
    /// The app to start first, if any.
    app: Option<App>,
    /// uvicorn's environment (serve.sh's and app.py's knobs).
    env: &'static [(&'static str, &'static str)],
    /// Lines of nginx.conf.template replaced.
    nginx: &'static [(&'static str, &'static str)],
    /// The path load.py asks for, and how many at once.
    path: &'static str,
    concurrency: u32,
    requests: u32,
    expect: &'static [Expect],
}

/// One kind of failure a case must produce, as nginx logs it and as fdtrace must name it.
struct Expect {
    phase: &'static str,
    /// The causes fdtrace may give: their counts add up to nginx's lines.
    causes: &'static [&'static str],
    /// Of which this one must be named at least once.
    named: &'static str,
    errno: &'static str,
    /// What nginx's error.log says for each failure.
    logged: &'static str,
    /// What fdtrace's live output says at the first one (before the peer, after it).
    live: (&'static str, &'static str),
    /// For timeouts: the nginx directive fdtrace must tie them to, from `nginx -T`.
    directive: Option<&'static str>,
}

const REFUSED: &[Expect] = &[Expect {
    phase: "connect",
    causes: &["refused"],
    named: "refused",
    errno: "ECONNREFUSED",
    logged: "(111: Connection refused) while connecting to upstream",
    live: ("connect to ", " failed with ECONNREFUSED"),
    directive: None,
}];

const PERMISSION: &[Expect] = &[Expect {
    phase: "connect",
    causes: &["permission"],
    named: "permission",
    errno: "EACCES",
    logged: "(13: Permission denied) while connecting to upstream",
    live: ("connect to ", " failed with EACCES"),
    directive: None,
}];

const NO_SOCKET: &[Expect] = &[Expect {
    phase: "connect",
    causes: &["no_socket"],
    named: "no_socket",
    errno: "ENOENT",
    logged: "(2: No such file or directory) while connecting to upstream",
    live: ("connect to ", " failed with ENOENT"),
    directive: None,
}];

/// nginx's 504 for the requests that did reach an app slower than proxy_read_timeout.
const UNANSWERED: Expect = Expect {
    phase: "response",
    causes: &["timeout"],
    named: "timeout",
    errno: "ETIMEDOUT",
    logged: "upstream timed out (110: Connection timed out) while reading response header from upstream",
    live: ("request to ", " unanswered, closed after"),
    directive: Some("proxy_read_timeout 1s"),
};

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
        let (blocked, slow) = (free_port()?, free_port()?);
        let owned = root.join("unix-owner").join("app.sock");
        let missing = root.join("no-socket").join("app.sock");
        let plain = |name, upstream, app, expect| Case {
            name,
            upstream,
            app,
            env: &[],
            nginx: &[],
            path: "/",
            concurrency: 4,
            requests: REQUESTS,
            expect,
        };
        let cases = [
            plain("down", format!("127.0.0.1:{down}"), None, REFUSED),
            plain(
                "wrong-port",
                format!("127.0.0.1:{wrong}"),
                Some(App::Port(app_port)),
                REFUSED,
            ),
            plain(
                "unix-owner",
                format!("unix:{}", owned.display()),
                Some(App::Socket(owned.clone())),
                PERMISSION,
            ),
            plain(
                "no-socket",
                format!("unix:{}", missing.display()),
                None,
                NO_SOCKET,
            ),
            Case {
                name: "backlog-full",
                upstream: format!("127.0.0.1:{blocked}"),
                app: Some(App::Port(blocked)),
                env: &[("BACKLOG", "2"), ("BLOCK_SECONDS", "1.5")],
                // Under the SYN's first retransmission (1 s): every connect nginx gives up on
                // is still waiting for its handshake.
                nginx: &[("proxy_connect_timeout 1s;", "proxy_connect_timeout 500ms;")],
                path: "/block",
                concurrency: 16,
                requests: REQUESTS,
                expect: &[
                    Expect {
                        phase: "connect",
                        causes: &["backlog_full", "timeout"],
                        named: "backlog_full",
                        errno: "ETIMEDOUT",
                        logged: "upstream timed out (110: Connection timed out) while connecting to upstream",
                        live: ("connect to ", " timed out after"),
                        directive: Some("proxy_connect_timeout 500ms"),
                    },
                    UNANSWERED,
                ],
            },
            Case {
                name: "timeout-mismatch",
                upstream: format!("127.0.0.1:{slow}"),
                app: Some(App::Port(slow)),
                env: &[("SLOW_SECONDS", "2")],
                nginx: &[],
                path: "/slow",
                // Each waits out nginx's 1 s: two rounds.
                concurrency: 8,
                requests: 16,
                expect: &[UNANSWERED],
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
                    .env("LEAK", "0")
                    .envs(case.env.iter().copied());
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
        let nginx = start_nginx_with(&self.sources, &dir, nginx_port, &case.upstream, case.nginx)?;
        wait_for_port(nginx_port, &nginx)?;
        // What a user would hand fdtrace: nginx's whole configuration as `nginx -T` prints it.
        let conf = dir.join("nginx-T.txt");
        let dump = Command::new("nginx")
            .arg("-T")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .output()
            .context("running nginx -T")?;
        ensure!(dump.status.success(), "nginx -T failed: {dump:?}");
        fs::write(&conf, &dump.stdout)?;
        let report_path = dir.join("report.json");
        let tracer = Tracer::start(
            Command::new(&self.fdtrace)
                .args(["--pid", &nginx.pid().to_string(), "--follow"])
                .arg("--nginx-conf")
                .arg(&conf)
                .args(["--no-tui", "--format", "json", "-o"])
                .arg(&report_path),
            &dir.join("fdtrace.log"),
        )?;
        let requests = case.requests.to_string();
        let load = Command::new(&self.python)
            .arg(self.sources.join("load.py"))
            .args(["--port", &nginx_port.to_string(), "--path", case.path])
            .args(["--concurrency", &case.concurrency.to_string()])
            .args(["--requests", &requests, "--timeout", "10"])
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
        let report: Report = serde_json::from_slice(&fs::read(&report_path)?)
            .with_context(|| format!("parsing {}", report_path.display()))?;
        let peer = case.upstream.clone();
        let named: Vec<&Upstream> = report
            .upstream_failures
            .iter()
            .filter(|u| u.peer == peer)
            .collect();
        let log = fs::read_to_string(dir.join("fdtrace.log")).unwrap_or_default();
        let mut seen = Vec::new();
        for expect in case.expect {
            let logged = errors.lines().filter(|l| l.contains(expect.logged)).count() as u64;
            ensure!(
                logged > 0,
                "nginx logged no {:?} (load: {load})",
                expect.logged
            );
            let groups: Vec<&&Upstream> = named
                .iter()
                .filter(|u| u.phase == expect.phase && expect.causes.contains(&u.cause.as_str()))
                .collect();
            let counted: u64 = groups.iter().map(|u| u.count).sum();
            ensure!(
                counted == logged && groups.iter().all(|u| u.errno == expect.errno),
                "fdtrace counted {counted} {} {:?} ({}) to {peer}, nginx's error.log {logged} {:?}: {:?}",
                expect.phase,
                expect.causes,
                expect.errno,
                expect.logged,
                report.upstream_failures
            );
            ensure!(
                groups.iter().any(|u| u.cause == expect.named),
                "fdtrace did not name {:?}: {groups:?}",
                expect.named
            );
            let line = format!("{}{peer}{}", expect.live.0, expect.live.1);
            ensure!(log.contains(&line), "fdtrace's live output lacks {line:?}");
            if let Some(directive) = expect.directive {
                // The timer nginx's configuration sets, and the durations ending at it.
                ensure!(
                    groups.iter().all(
                        |u| u.nginx_timeout.as_deref() == Some(directive) && u.at_nginx_timeout
                    ),
                    "fdtrace did not tie the timeouts to {directive}: {groups:?}"
                );
            }
            seen.push(format!(
                "{logged} x {:?}: fdtrace {counted} {} {}",
                expect.logged,
                expect.phase,
                groups
                    .iter()
                    .map(|u| format!("{} {}", u.count, u.cause))
                    .collect::<Vec<_>>()
                    .join(" + ")
            ));
        }
        let mut hint = String::new();
        // The wrong port: uvicorn listens, but not where nginx connects.
        if let Some(App::Port(port)) = &case.app
            && format!("127.0.0.1:{port}") != case.upstream
        {
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
            "e2e upstream {}: ok in {:.1}s. nginx {} (pid {}): {}{hint}. load: {load}",
            case.name,
            started.elapsed().as_secs_f64(),
            case.upstream,
            named.first().map_or(0, |u| u.pid),
            seen.join("; "),
        );
        Ok(())
    }
}
