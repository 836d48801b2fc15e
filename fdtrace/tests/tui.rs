//! The terminal UI end to end: the real binary in a tmux pane, attached to the leaking demo
//! server, read back with `tmux capture-pane`.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// A tmux server of our own (its own socket), killed with everything in it when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(width: u16, height: u16, command: &str) -> Self {
        let tmux = Self {
            socket: format!("fdtrace-tui-test-{}", std::process::id()),
        };
        let status = tmux
            .command()
            .args(["new-session", "-d", "-s", "ui", "-x"])
            .arg(width.to_string())
            .arg("-y")
            .arg(height.to_string())
            .arg(command)
            .status()
            .expect("tmux is installed");
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket]);
        cmd
    }

    fn screen(&self) -> String {
        let out = self
            .command()
            .args(["capture-pane", "-p", "-t", "ui"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let _ = self
            .command()
            .args(["send-keys", "-t", "ui", keys])
            .status();
    }

    /// Waits until the screen satisfies `ok`; panics with the last screen otherwise.
    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < timeout,
                "{what}: not on screen after {timeout:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn alive(&self) -> bool {
        self.command()
            .args(["has-session", "-t", "ui"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").status();
    }
}

#[test]
#[ignore = "root"]
fn the_live_view_names_the_leak_and_marks_emfile() {
    let (server, port) = common::start_demo_server();

    let dir = std::env::temp_dir().join(format!("fdtrace-tui-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.json");
    let command = format!(
        "cd {} && XDG_STATE_HOME={} {} --pid {} --format json -o {}",
        dir.display(),
        dir.display(),
        env!("CARGO_BIN_EXE_fdtrace"),
        server.0.id(),
        report.display()
    );
    let tmux = Tmux::start(160, 45, &command);
    let screen = tmux.wait_for("the header", Duration::from_secs(30), |s| {
        s.contains("demo-server") && s.contains("/128 open")
    });
    assert!(!screen.contains("first EMFILE"), "{screen}");

    // The demo leaks one file per answered request and runs with a limit of 128.
    let answered = (0..140).filter(|_| common::request(port)).count();
    assert!(
        answered < 140,
        "the server should have run out of descriptors"
    );

    let screen = tmux.wait_for(
        "the leak and the EMFILE mark",
        Duration::from_secs(15),
        |s| s.contains("load_template") && s.contains("first EMFILE") && s.contains("accept4"),
    );
    assert!(screen.contains("limit 128"), "{screen}");
    // At least the limit: descriptors inherited from the test harness count too.
    assert!(screen.contains("/128 open (10"), "{screen}");
    // The EMFILE label carries the wall time to the millisecond: HH:MM:SS.mmm.
    let label = screen
        .lines()
        .find_map(|l| l.split("first EMFILE ").nth(1))
        .unwrap();
    let time: String = label.chars().take(12).collect();
    assert!(
        time.len() == 12 && time.as_bytes()[2] == b':' && time.as_bytes()[8] == b'.',
        "{time:?} in\n{screen}"
    );

    // `e` writes a report snapshot and says where.
    tmux.keys("e");
    let screen = tmux.wait_for("the report path", Duration::from_secs(5), |s| {
        s.contains("report written to ")
    });
    let written = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("fdtrace-report-")
        });
    assert!(written, "{screen}");

    // `q` closes the view and leaves the final report where -o says.
    tmux.keys("q");
    let start = Instant::now();
    while tmux.alive() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !tmux.alive(),
        "fdtrace did not exit on q:\n{}",
        tmux.screen()
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["emfile"][0]["limit"], 128);
    let log = std::fs::read_to_string(dir.join("fdtrace.log")).unwrap_or_default();
    assert!(log.contains("terminal UI closed"), "{log}");
    drop(tmux);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
