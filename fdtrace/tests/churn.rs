//! Long sessions: memory stays bounded under process churn, and the report stays exact and
//! short. The model's heap is measured with a counting allocator (this test binary's); the
//! root test traces the churn fixture with the real binary and watches its RSS.

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    fs,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicIsize, Ordering},
    },
    time::{Duration, Instant},
};

use fdtrace::{
    clock::WallClock,
    model::{Event, FdKind, Limit, Model, NewFd, Pid, ProcessInfo},
    report::Report,
    tracer::Stacks,
};

/// Bytes the heap holds: what was allocated and not freed, by this whole test binary.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The heap tests measure one model at a time: other tests of this binary allocate too.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn held() -> isize {
    HELD.load(Ordering::Relaxed)
}

const MS: u64 = 1_000_000;
const SHELL: Pid = 100;

fn fd(fd: i32, kind: FdKind, target: &str, cloexec: bool) -> NewFd {
    NewFd {
        fd,
        kind,
        target: Arc::from(target),
        cloexec,
    }
}

fn info(comm: &str) -> ProcessInfo {
    ProcessInfo {
        ppid: 1,
        comm: comm.into(),
        exe: format!("/usr/bin/{comm}"),
        limit: Limit {
            soft: 1024,
            hard: 524_288,
        },
        ..ProcessInfo::default()
    }
}

/// A shell with stdio and its script open (fd 255, close-on-exec), as bash keeps them.
fn shell() -> Model {
    let mut m = Model::new();
    m.apply(&Event::Attached {
        pid: SHELL,
        ts: MS,
        info: info("bash"),
        fds: vec![
            fd(0, FdKind::File, "/dev/pts/0", false),
            fd(1, FdKind::Pipe, "pipe:[11]", false),
            fd(2, FdKind::File, "/dev/pts/0", false),
            fd(255, FdKind::File, "/tmp/script.sh", true),
        ],
    });
    m
}

/// What a dynamically linked `true` does, as the probes report it: fork, exec, the loader
/// opens and closes two files (from stacks of its own, which are the same in every child),
/// exit. `leak` leaves a descriptor of its own open at exit.
fn child(m: &mut Model, pid: Pid, ts: u64, leak: bool) {
    m.apply(&Event::Forked {
        parent: SHELL,
        child: pid,
        ts,
        shares_table: false,
        ns_pid: None,
        container: None,
    });
    m.apply(&Event::Exec {
        pid,
        ts: ts + 10,
        info: info("true"),
    });
    for (stack, target) in [
        (1, "/etc/ld.so.cache"),
        (2, "/lib/x86_64-linux-gnu/libc.so.6"),
    ] {
        m.apply(&Event::Opened {
            pid,
            tid: pid,
            ts: ts + 20,
            syscall: 257,
            fds: vec![fd(3, FdKind::File, target, true)],
            stack,
        });
        m.apply(&Event::Closed {
            pid,
            ts: ts + 30,
            fd: 3,
            reopened: false,
        });
    }
    if leak {
        m.apply(&Event::Opened {
            pid,
            tid: pid,
            ts: ts + 40,
            syscall: 257,
            fds: vec![fd(3, FdKind::File, "/etc/hostname", false)],
            stack: 3,
        });
    }
    m.apply(&Event::Exited {
        pid,
        ts: ts + 50,
        code: Some(0),
    });
}

/// Heap bytes each exited child added, from child `from` to child `to` of a shell (the first
/// few set up what every later one reuses).
fn bytes_per_child(from: u32, to: u32, leak: bool) -> f64 {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut m = shell();
    let mut before = held();
    for i in 0..to {
        if i == from {
            before = held();
        }
        child(&mut m, 1_000 + i, u64::from(i) * MS, leak);
        if i % 1_000 == 0 {
            m.apply(&Event::Tick {
                ts: u64::from(i) * MS,
            });
        }
    }
    let grown = held() - before;
    drop(m);
    grown as f64 / f64::from(to - from)
}

#[test]
fn an_exited_child_costs_a_few_hundred_bytes_and_past_the_bound_nothing() {
    // Up to the bounds (MAX_EXITED_KEPT records, MAX_EXITED_BYTES of them) each exit costs
    // its record; past them, nothing.
    let kept = fdtrace::model::MAX_EXITED_KEPT as u32;
    let clean = bytes_per_child(100, kept, false);
    let leaky = bytes_per_child(100, 3_000, true);
    eprintln!("per exited child: {clean:.0} B clean, {leaky:.0} B with a descriptor open");
    assert!(clean <= 400.0, "{clean} bytes per clean child");
    assert!(leaky <= 1_100.0, "{leaky} bytes per leaky child");
    // Past the bound, children are folded into counts: memory stops growing.
    let past = bytes_per_child(2 * kept, 4 * kept, true);
    eprintln!("per exited child past {}: {past:.1} B", 2 * kept);
    assert!(past <= 4.0, "{past} bytes per child past the bound");
}

/// 100k distinct sites with descriptors open (1000 processes, 100 stacks each), each having
/// closed some, sampled for growth: the model's heap.
#[test]
fn a_hundred_thousand_sites_fit_in_a_hundred_megabytes() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = held();
    let mut m = Model::new();
    let mut ts = MS;
    for p in 0..1_000u32 {
        let pid = 10_000 + p;
        m.apply(&Event::Attached {
            pid,
            ts,
            info: info("worker"),
            fds: vec![fd(0, FdKind::File, "/dev/null", false)],
        });
        for stack in 0..100u32 {
            let n = 3 + i32::try_from(stack).unwrap();
            let target = format!("/srv/data/{p}/{stack}");
            for (step, keep) in [(0, false), (1, false), (2, true)] {
                ts += 1_000;
                m.apply(&Event::Opened {
                    pid,
                    tid: pid,
                    ts,
                    syscall: 257,
                    fds: vec![fd(n, FdKind::File, &target, false)],
                    stack: 1 + p * 100 + stack,
                });
                if !keep {
                    m.apply(&Event::Closed {
                        pid,
                        ts: ts + 1_000 * (step + 1),
                        fd: n,
                        reopened: false,
                    });
                }
            }
        }
    }
    for s in 0..40 {
        m.apply(&Event::Tick {
            ts: ts + s * 1_000 * MS,
        });
    }
    let sites = m.sites.len();
    let heap = held() - before;
    eprintln!(
        "{sites} sites: {:.1} MB of heap, {:.0} B per site",
        heap as f64 / 1e6,
        heap as f64 / sites as f64
    );
    assert!(sites >= 100_000);
    assert!(heap <= 100_000_000, "{heap} bytes");
    drop(m);
}

/// One real leak among 5000 clean children: a short text report, a JSON entry for each
/// process, stacks for none of the clean ones.
#[test]
fn five_thousand_clean_children_fold_into_one_line() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut m = shell();
    for i in 0..5_000 {
        child(&mut m, 1_000 + i, u64::from(i) * MS, i == 2_500);
    }
    let report = Report::build(&m, &Stacks::default(), &WallClock { offset_ns: 0 });
    let text = report.to_text();
    eprintln!("{text}");
    assert!(text.len() <= 30_000, "{} bytes", text.len());
    assert!(
        text.contains("==fdtrace== 4,999 processes exited clean (true ×4,999)"),
        "{text}"
    );
    assert!(text.contains("==3500== FILE DESCRIPTORS: 4 open at exit (1 opened while traced"));
    assert_eq!(report.leaked(), 1);
    let markdown = report.to_markdown();
    assert!(markdown.len() <= 30_000, "{} bytes", markdown.len());
    assert!(markdown.contains("\n4,999 processes exited clean (true ×4,999).\n"));
    assert_eq!(report.processes.len(), 5_001);
    let pids: std::collections::BTreeSet<Pid> = report.sites.iter().map(|s| s.pid).collect();
    assert_eq!(pids, [SHELL, 3_500].into());
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    let clean = json["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == 1_000)
        .unwrap();
    assert_eq!(clean["open_at_end"], 3);
    assert_eq!(clean["exited"], true);
    assert_eq!(clean["comm"], "true");
}

/// The lines of `tests/fixtures/churn.c` holding `marker`.
fn marker_line(marker: &str) -> u32 {
    let text = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/churn.c"
    ))
    .unwrap();
    let index = text
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("{marker} not in churn.c"));
    u32::try_from(index).unwrap() + 1
}

/// A kB field of /proc/PID/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// `fdtrace run` over thousands of short children for 30 s: its RSS stays bounded and flat,
/// and the report is exact (every process accounted for, the one leak attributed to its line,
/// the clean children one line).
#[test]
#[ignore = "root"]
fn a_churning_fork_loop_keeps_fdtrace_bounded_and_the_report_exact() {
    const SECONDS: u64 = 30;
    let bin = common::build_c("churn.c", &["-O2", "-g", "-fomit-frame-pointer"]);
    let report_path =
        std::env::temp_dir().join(format!("fdtrace-churn-{}.json", std::process::id()));
    // Paced to about 250 children a second: a debug build of fdtrace keeps up with that, so
    // what is measured is memory, not a backlog.
    let mut fdtrace = Command::new(env!("CARGO_BIN_EXE_fdtrace"))
        .args(["run", "--format", "json", "-o"])
        .arg(&report_path)
        .arg("--")
        .arg(&bin)
        .args(["seconds", &SECONDS.to_string(), "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fdtrace run");
    let pid = fdtrace.id();
    let started = Instant::now();
    // (seconds since start, RSS) every half second.
    let mut curve: Vec<(f64, u64)> = Vec::new();
    let mut hwm = 0;
    while fdtrace.try_wait().unwrap().is_none() {
        if let (Some(rss), Some(peak)) = (status_bytes(pid, "VmRSS:"), status_bytes(pid, "VmHWM:"))
        {
            curve.push((started.elapsed().as_secs_f64(), rss));
            hwm = peak;
        }
        assert!(
            started.elapsed() < Duration::from_secs(SECONDS * 4),
            "fdtrace run did not finish"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = fdtrace.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        BufReader::new(stdout.as_bytes())
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the fixture's output: {stdout}"))
    };
    let (children, leaker) = (field("children "), field("leaker "));
    let mb = |b: u64| b as f64 / 1e6;
    let shown: Vec<String> = curve
        .iter()
        .step_by(6)
        .map(|&(t, rss)| format!("{t:.0}s {:.1}", mb(rss)))
        .collect();
    eprintln!(
        "{children} children in {:.1}s; fdtrace peak {:.1} MB; RSS {}",
        started.elapsed().as_secs_f64(),
        mb(hwm),
        shown.join(", ")
    );
    // An emulated guest (`cargo xtask vm-test`) forks several times slower: 364 to 549 in 30 s
    // alone, 94 in 6.1's guest while 6.12's ran beside it (2026-12-07).
    let enough = if common::emulated() { 50 } else { 3_000 };
    assert!(children >= enough, "only {children} children");
    assert!(hwm <= 150_000_000, "peak RSS {:.1} MB", mb(hwm));
    // Flat while the children run: from a fifth of the way in (probes loaded, first stacks
    // symbolized) to the fixture's end, within 10%. (The report is built after that.) Not in
    // an emulated guest: there start-up takes half the run, and its one-time step of about
    // 27 MB came at 6 s in a quiet guest but at 22 s in one sharing its host, inside the
    // window; memory per child does not depend on the kernel, and the host run checks it.
    if common::emulated() {
        println!("emulated: RSS flatness is checked on the host, the peak here");
    } else {
        let settle = SECONDS as f64 / 5.0;
        let settled = curve
            .iter()
            .find(|(t, _)| *t >= settle)
            .map_or(0, |&(_, rss)| rss);
        let last = curve
            .iter()
            .filter(|(t, _)| *t >= settle && *t <= SECONDS as f64)
            .map(|&(_, rss)| rss)
            .max()
            .unwrap_or(0);
        assert!(
            last as f64 <= settled as f64 * 1.10,
            "RSS grew from {:.1} MB to {:.1} MB",
            mb(settled),
            mb(last)
        );
    }

    let report: Report = serde_json::from_slice(&fs::read(&report_path).unwrap()).unwrap();
    let _ = fs::remove_file(&report_path);
    assert_eq!(report.dropped_events, 0, "records lost");
    // Every process: the fixture, its children, each `true` (the exec keeps the pid).
    let total = report.processes.len() as u64 + report.folded.processes;
    assert_eq!(total, children + 1, "processes listed and folded");
    let clean: u64 = report.folded.clean.iter().map(|c| c.processes).sum::<u64>()
        + report
            .processes
            .iter()
            .filter(|p| p.exited && !report.sites.iter().any(|s| s.pid == p.pid))
            .count() as u64;
    assert_eq!(clean, children, "all but the leaker exited clean");
    let leaks: Vec<_> = report.sites.iter().filter(|s| !s.inherited).collect();
    assert_eq!(leaks.len(), 1, "{leaks:#?}");
    let leak = leaks[0];
    assert_eq!(
        (leak.pid, leak.kind, leak.open, &leak.fds[..]),
        (u32::try_from(leaker).unwrap(), FdKind::File, 1, &[3][..])
    );
    assert_eq!(leak.targets, ["/etc/hostname"]);
    let line = leak
        .frames
        .iter()
        .find(|f| f.function.as_deref() == Some("leak_at_exit"))
        .and_then(|f| f.line);
    assert_eq!(
        line,
        Some(marker_line("/* LEAK exit */")),
        "{:#?}",
        leak.frames
    );
    assert!(report.processes.len() <= fdtrace::model::MAX_EXITED_KEPT + 1);
    let text = report.to_text();
    assert!(text.len() <= 30_000, "{} bytes of text", text.len());
    assert!(text.contains(" processes exited clean (true ×"), "{text}");
}

/// Workers that each leak the same way are listed once, with how many more did.
#[test]
fn children_that_leak_alike_are_listed_once() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut m = shell();
    for i in 0..500 {
        child(&mut m, 1_000 + i, u64::from(i) * MS, true);
    }
    let report = Report::build(&m, &Stacks::default(), &WallClock { offset_ns: 0 });
    let text = report.to_text();
    assert!(text.len() <= 5_000, "{text}");
    assert!(
        text.contains(
            "==1000== and 499 more true processes exited with the same open at exit: pids 1001, \
             1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, ...\n"
        ),
        "{text}"
    );
    assert_eq!(report.leaked(), 500);
    assert_eq!(report.sites.iter().filter(|s| !s.inherited).count(), 500);
}
