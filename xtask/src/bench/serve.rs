//! The bench's `serve` section: `fdtrace serve`'s memory and losses while it watches a tight
//! open/close loop (about a million events a second), without and with the flight recorder,
//! whose two segments of encoded events are what it adds.

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{Bench, Row, SAMPLE_EVERY, status_field};
use crate::e2e::{
    Service, free_port,
    serve::{get, sample},
};

/// Iterations of the loop: 15-20 s traced.
const ITERATIONS: u64 = 20_000_000;
/// serve's RSS must stay under this (the long-sessions issue's bound for a busy target).
const RSS_BOUND: u64 = 200_000_000;

struct ServeRun {
    /// RSS when the loop ended, and the most it reached.
    rss_end: u64,
    hwm: u64,
    /// RSS at the loop's first and second half-way points, for flatness.
    rss_half: u64,
    lost: u64,
    seconds: f64,
}

impl Bench {
    pub(super) fn serve(&self, rows: &mut Vec<Row>) -> anyhow::Result<()> {
        for flight in [false, true] {
            let run = self.serve_run(flight)?;
            let growth = run.rss_end as f64 / run.rss_half.max(1) as f64;
            rows.push(
                Row::new(
                    format!(
                        "serve: RSS watching a 1M-events/s loop, {}",
                        if flight {
                            "flight recorder on"
                        } else {
                            "no flight recorder"
                        }
                    ),
                    Some(run.rss_end as f64 / 1e6),
                    "MB",
                )
                .ratio(growth)
                .target(
                    "<= 200 MB, flat within 10% over the second half, 0 lost",
                    run.rss_end <= RSS_BOUND && growth <= 1.10 && run.lost == 0,
                )
                .note(format!(
                    "half-way {:.1} MB, peak {:.1} MB (the first burst, while stacks are \
                     symbolized); {} events lost; loop ran {:.1} s",
                    run.rss_half as f64 / 1e6,
                    run.hwm as f64 / 1e6,
                    run.lost,
                    run.seconds
                )),
            );
        }
        Ok(())
    }

    fn serve_run(&self, flight: bool) -> anyhow::Result<ServeRun> {
        let port = free_port()?;
        let comm: String = self
            .loop_bin
            .file_name()
            .and_then(|n| n.to_str())
            .context("the loop's name")?
            .chars()
            .take(15)
            .collect();
        let mut command = Command::new(&self.fdtrace);
        command
            .args(["serve", "--comm", &comm, "--listen"])
            .arg(format!("127.0.0.1:{port}"));
        if flight {
            let dir = self.dir.join("flight");
            let _ = fs::remove_dir_all(&dir);
            command.arg("--flight-recorder").arg(dir);
        }
        let serve = Service::start("fdtrace serve", &mut command, &self.dir.join("serve.log"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(port, "/healthz").is_none() {
            serve.ensure_running()?;
            anyhow::ensure!(Instant::now() < deadline, "fdtrace serve did not answer");
            thread::sleep(Duration::from_millis(100));
        }
        let status_path = format!("/proc/{}/status", serve.pid());
        let rss = || {
            fs::read_to_string(&status_path)
                .ok()
                .and_then(|s| status_field(&s, "VmRSS:"))
                .unwrap_or(0)
        };
        let started = Instant::now();
        let mut looping = Command::new(&self.loop_bin)
            .arg(ITERATIONS.to_string())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the loop")?;
        let mut curve = Vec::new();
        while looping.try_wait()?.is_none() {
            curve.push(rss());
            thread::sleep(SAMPLE_EVERY);
        }
        let seconds = started.elapsed().as_secs_f64();
        let rss_end = rss();
        // Its last records drain, and the metrics render once a second.
        thread::sleep(Duration::from_secs(2));
        let metrics = get(port, "/metrics").context("no /metrics from serve")?;
        let lost = sample(&metrics, "fdtrace_events_lost_total", &[]).unwrap_or(0.0) as u64;
        let hwm = fs::read_to_string(&status_path)
            .ok()
            .and_then(|s| status_field(&s, "VmHWM:"))
            .unwrap_or(0);
        Ok(ServeRun {
            rss_end,
            hwm,
            rss_half: curve.get(curve.len() / 2).copied().unwrap_or(rss_end),
            lost,
            seconds,
        })
    }
}
