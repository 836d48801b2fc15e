//! The real probes against fixture programs that report their own ground truth.

mod common;

use std::{collections::BTreeSet, fs};

use fdtrace::{model::Event, probe::ProbeOptions};
use fdtrace_common::syscalls;

#[test]
#[ignore = "root"]
fn openat_results_arrive_exactly_and_only_for_the_traced_process() {
    let fixture = common::build_c("open_known.c", &["-O2", "-static"]);
    let truth_file =
        std::env::temp_dir().join(format!("fdtrace-open-known-{}", std::process::id()));
    let truth_path = truth_file.to_str().unwrap();
    let run = common::run_traced(
        &[
            fixture.to_str().unwrap(),
            truth_path,
            "/etc/hostname",
            "/etc/passwd",
            "/nonexistent/x",
            "/etc/hostname",
        ],
        ProbeOptions::default(),
    );
    assert_eq!(run.exit_code, 0);

    // What the fixture says openat returned, successes only (failures other than EMFILE are
    // not events).
    let truth: Vec<(String, i32)> = fs::read_to_string(&truth_file)
        .unwrap()
        .lines()
        .map(|l| {
            let (path, fd) = l.rsplit_once(' ').unwrap();
            (path.to_string(), fd.parse().unwrap())
        })
        .filter(|(_, fd)| *fd >= 0)
        .collect();
    let _ = fs::remove_file(&truth_file);
    assert_eq!(truth.len(), 4, "{truth:?}");

    let seen: Vec<(String, i32)> = run
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Opened {
                pid, syscall, fds, ..
            } if *pid == run.pid && *syscall == syscalls::OPENAT => {
                Some((fds[0].target.to_string(), fds[0].fd))
            }
            _ => None,
        })
        .collect();
    assert_eq!(seen, truth);

    // Nothing from any other process reached the model.
    let pids: BTreeSet<u32> = run.session.model.processes.keys().copied().collect();
    assert_eq!(pids, BTreeSet::from([run.pid]));
    let foreign = run.events.iter().any(|e| match e {
        Event::Opened { pid, .. } | Event::Closed { pid, .. } | Event::Exited { pid, .. } => {
            *pid != run.pid
        }
        _ => false,
    });
    assert!(!foreign, "events from other processes: {:?}", run.events);
    assert_eq!(run.session.model.dropped, 0);
}
