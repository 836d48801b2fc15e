//! The real probes against fixtures that exercise every descriptor-creating syscall, every way
//! of dropping one, exec and fork, each reporting its own /proc/self/fd as the ground truth.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::PathBuf,
    time::Instant,
};

use fdtrace::{
    model::{Corrections, Event, FdKind, Model, Pid},
    probe::ProbeOptions,
    procfs::kind_of_link,
};
use fdtrace_common::syscalls;

/// A fixture's report: its /proc/self/fd listing and the creating syscalls it saw fail.
struct Listing {
    fds: BTreeMap<i32, String>,
    skipped: BTreeSet<String>,
}

fn read_listing(path: &PathBuf) -> Listing {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let _ = fs::remove_file(path);
    let mut listing = Listing {
        fds: BTreeMap::new(),
        skipped: BTreeSet::new(),
    };
    for line in text.lines() {
        let (left, right) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        if left == "skipped" {
            listing.skipped.insert(right.to_string());
        } else {
            listing.fds.insert(left.parse().unwrap(), right.to_string());
        }
    }
    listing
}

fn out_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fdtrace-{name}-{}", std::process::id()))
}

/// Descriptors of `pid` created and closed in the kernel, as the events counted them.
fn pairs_of(events: &[Event], pid: Pid) -> u64 {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Balanced { pid: p, count, .. } if *p == pid => Some(*count),
            _ => None,
        })
        .sum()
}

/// Every difference between the model's table for `pid` at exit and what /proc listed, one
/// line each (empty when they agree on the numbers and the kinds).
fn table_differences(model: &Model, pid: Pid, listing: &Listing) -> Vec<String> {
    let table = model
        .open_fds(pid)
        .unwrap_or_else(|| panic!("no table for {pid}"));
    let numbers: BTreeSet<i32> = table.keys().chain(listing.fds.keys().copied()).collect();
    let mut diffs = Vec::new();
    for n in numbers {
        let diff = match (table.get(n), listing.fds.get(&n)) {
            (Some(f), None) => format!(
                "fd {n}: model has {:?} {:?}, /proc has nothing",
                f.kind, f.target
            ),
            (None, Some(link)) => format!("fd {n}: /proc has {link:?}, model has nothing"),
            (Some(f), Some(link)) if f.kind != kind_of_link(link) => format!(
                "fd {n}: model has {:?} {:?}, /proc has {link:?} ({:?})",
                f.kind,
                f.target,
                kind_of_link(link)
            ),
            _ => continue,
        };
        diffs.push(diff);
    }
    diffs
}

#[test]
#[ignore = "root"]
fn every_creation_and_drop_matches_proc_self_fd() {
    check_every_creation_and_drop(ProbeOptions::default());
}

/// The raw tracepoint and the BTF exit path that older kernels (6.1, 6.12) take, on this one.
#[test]
#[ignore = "root"]
fn every_creation_and_drop_matches_proc_self_fd_on_the_older_kernels_paths() {
    check_every_creation_and_drop(ProbeOptions {
        fallbacks: true,
        ..ProbeOptions::default()
    });
}

fn check_every_creation_and_drop(options: ProbeOptions) {
    let fixture = common::build_c("sys_all.c", &["-O2", "-g"]);
    // Named per variant: the two variants may run at once.
    let out = out_file(&format!("sys-all-{}", options.fallbacks));
    let started = Instant::now();
    let run = common::run_traced(&[fixture.to_str().unwrap(), out.to_str().unwrap()], options);
    eprintln!("sys_all traced in {:?}", started.elapsed());
    assert_eq!(run.exit_code, 0, "the fixture failed (see its stderr)");
    let listing = read_listing(&out);
    let model = &run.session.model;

    // The probes lost nothing, and the table is right by the events alone. The run is shorter
    // than the session's reconciliation period, and a difference is corrected only when two
    // listings agree on it, so nonzero `added`/`removed` would mean the run took seconds;
    // `reused` counts creations that returned a number the model still held: a missed close.
    assert_eq!(model.dropped, 0, "records lost");
    assert_no_corrections(
        model.corrections,
        "reconciliation or reuse corrected the model",
    );

    // Both checks below report everything they find before the test fails.
    let mut problems = Vec::new();
    let diffs = table_differences(model, run.pid, &listing);
    if !diffs.is_empty() {
        problems.push(format!(
            "the model's table at exit differs from /proc/self/fd:\n  {}\nlisting: {:#?}",
            diffs.join("\n  "),
            listing.fds
        ));
    }

    // Every creating syscall the fixture made reached the model under its own number.
    let mut opened: BTreeSet<u32> = BTreeSet::new();
    let mut dup_fcntl = BTreeSet::new();
    for event in &run.events {
        match event {
            Event::Opened { pid, syscall, .. } if *pid == run.pid => {
                opened.insert(*syscall);
            }
            Event::Duplicated {
                pid,
                syscall,
                cloexec,
                ..
            } if *pid == run.pid => {
                opened.insert(*syscall);
                if *syscall == syscalls::FCNTL {
                    dup_fcntl.insert(*cloexec);
                }
            }
            Event::Fetched { pid, .. } if *pid == run.pid => {
                opened.insert(syscalls::PIDFD_GETFD);
            }
            _ => {}
        }
    }
    let mut exercised = vec![
        ("open", syscalls::OPEN),
        ("openat", syscalls::OPENAT),
        ("openat2", syscalls::OPENAT2),
        ("creat", syscalls::CREAT),
        ("open_by_handle_at", syscalls::OPEN_BY_HANDLE_AT),
        ("socket", syscalls::SOCKET),
        ("socketpair", syscalls::SOCKETPAIR),
        ("accept", syscalls::ACCEPT),
        ("accept4", syscalls::ACCEPT4),
        ("dup", syscalls::DUP),
        ("dup2", syscalls::DUP2),
        ("dup3", syscalls::DUP3),
        ("fcntl(F_DUPFD)", syscalls::FCNTL),
        ("fcntl(F_DUPFD_CLOEXEC)", syscalls::FCNTL),
        ("pipe", syscalls::PIPE),
        ("pipe2", syscalls::PIPE2),
        ("eventfd", syscalls::EVENTFD),
        ("eventfd2", syscalls::EVENTFD2),
        ("epoll_create", syscalls::EPOLL_CREATE),
        ("epoll_create1", syscalls::EPOLL_CREATE1),
        ("timerfd_create", syscalls::TIMERFD_CREATE),
        ("signalfd", syscalls::SIGNALFD),
        ("signalfd4", syscalls::SIGNALFD4),
        ("inotify_init", syscalls::INOTIFY_INIT),
        ("inotify_init1", syscalls::INOTIFY_INIT1),
        ("fanotify_init", syscalls::FANOTIFY_INIT),
        ("memfd_create", syscalls::MEMFD_CREATE),
        ("pidfd_open", syscalls::PIDFD_OPEN),
        ("pidfd_getfd", syscalls::PIDFD_GETFD),
        ("userfaultfd", syscalls::USERFAULTFD),
        ("perf_event_open", syscalls::PERF_EVENT_OPEN),
        ("bpf", syscalls::BPF),
        ("io_uring_setup", syscalls::IO_URING_SETUP),
    ];
    // Syscalls a kernel of the matrix refuses by configuration or policy, by kernel release
    // prefix and why; anything else failing is a failure, so that a syscall this test did not
    // exercise cannot pass unseen. None is refused on 6.1, 6.12 or 6.18 today.
    let refusals: &[(&str, &str, &str)] = &[];
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Not the kernel: the temporary directory's file system has no file handles (9p in the
    // kernel matrix's guests), so there was nothing to open by handle.
    if listing
        .skipped
        .contains("open_by_handle_at (no file handles here)")
    {
        eprintln!(
            "open_by_handle_at not exercised: no file handles on the temp directory's file system"
        );
        exercised.retain(|(name, _)| *name != "open_by_handle_at");
    }
    let mut missing = Vec::new();
    for (name, nr) in exercised {
        if listing.skipped.contains(name) {
            match refusals
                .iter()
                .find(|(syscall, kernel, _)| *syscall == name && release.starts_with(kernel))
            {
                Some((_, kernel, why)) => eprintln!("skipped: {kernel} refuses {name}: {why}"),
                None => problems.push(format!(
                    "the fixture's {name} failed on {} (see its stderr)",
                    release.trim()
                )),
            }
            continue;
        }
        let seen = match name {
            "fcntl(F_DUPFD)" => dup_fcntl.contains(&false),
            "fcntl(F_DUPFD_CLOEXEC)" => dup_fcntl.contains(&true),
            _ => opened.contains(&nr),
        };
        if !seen {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        problems.push(format!("no creation event for {missing:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
#[ignore = "root"]
fn forked_child_keeps_the_parents_call_site() {
    check_forked_child(ProbeOptions::default());
}

#[test]
#[ignore = "root"]
fn forked_child_keeps_the_parents_call_site_on_the_older_kernels_paths() {
    check_forked_child(ProbeOptions {
        fallbacks: true,
        ..ProbeOptions::default()
    });
}

fn check_forked_child(options: ProbeOptions) {
    let fixture = common::build_c(
        "sys_fork.c",
        &["-O2", "-fomit-frame-pointer", "-g", "-pthread"],
    );
    let (child_out, parent_out) = (
        out_file(&format!("sys-fork-child-{}", options.fallbacks)),
        out_file(&format!("sys-fork-parent-{}", options.fallbacks)),
    );
    let started = Instant::now();
    let run = common::run_traced(
        &[
            fixture.to_str().unwrap(),
            child_out.to_str().unwrap(),
            parent_out.to_str().unwrap(),
        ],
        options,
    );
    eprintln!("sys_fork traced in {:?}", started.elapsed());
    assert_eq!(run.exit_code, 0, "the fixture failed");
    let (child_listing, parent_listing) = (read_listing(&child_out), read_listing(&parent_out));
    let model = &run.session.model;
    assert_eq!(model.dropped, 0, "records lost");

    // The thread is part of the parent; the fork made exactly one more process.
    let pids: Vec<Pid> = model.processes.keys().copied().collect();
    assert_eq!(
        pids.len(),
        2,
        "expected the parent and one child, got {pids:?}"
    );
    let child = pids
        .into_iter()
        .find(|&p| p != run.pid)
        .expect("the parent is among the processes");
    let forks: Vec<&Event> = run
        .events
        .iter()
        .filter(|e| matches!(e, Event::Forked { .. }))
        .collect();
    assert!(
        matches!(forks[..], [Event::Forked { parent, child: c, shares_table: false, .. }] if *parent == run.pid && *c == child),
        "{forks:?}"
    );

    for (pid, listing, who) in [
        (child, &child_listing, "child"),
        (run.pid, &parent_listing, "parent"),
    ] {
        let diffs = table_differences(model, pid, listing);
        assert!(
            diffs.is_empty(),
            "the {who}'s table at exit differs from /proc:\n  {}",
            diffs.join("\n  ")
        );
    }

    // The descriptor named `target` (above stdio) in `pid`'s table at exit, and the functions
    // on its call site's stack.
    let site_functions = |pid: Pid, target: &str| -> Vec<String> {
        let listing = if pid == child {
            &child_listing
        } else {
            &parent_listing
        };
        let (fd, _) = listing
            .fds
            .iter()
            .find(|(n, link)| **n > 2 && link.as_str() == target)
            .unwrap_or_else(|| panic!("{target} is not in {pid}'s listing {:?}", listing.fds));
        let open = model.open_fds(pid).unwrap().get(*fd).unwrap();
        let site = &model.sites[open.site()];
        assert_eq!(
            site.pid, pid,
            "the site of {target} in {pid} is counted under {}",
            site.pid
        );
        run.session
            .tracer
            .stacks
            .get(site.stack)
            .iter()
            .filter_map(|f| f.function.clone())
            .collect()
    };
    let inherited = site_functions(child, "/dev/null");
    assert!(
        inherited.iter().any(|f| f == "parent_open"),
        "the child's inherited /dev/null: {inherited:?}"
    );
    let own = site_functions(child, "/dev/zero");
    assert!(
        own.iter().any(|f| f == "child_open"),
        "the child's /dev/zero: {own:?}"
    );
    let parents = site_functions(run.pid, "/dev/null");
    assert!(
        parents.iter().any(|f| f == "parent_open"),
        "the parent's /dev/null: {parents:?}"
    );

    // The thread's file is in the parent's table, opened by a thread that is not the parent.
    let thread_fd = parent_listing
        .fds
        .iter()
        .find(|(_, link)| link.as_str() == "/dev/urandom")
        .map(|(n, _)| *n)
        .expect("the thread's /dev/urandom is in the parent's listing");
    assert!(model.open_fds(run.pid).unwrap().get(thread_fd).is_some());
    let by_thread = run.events.iter().any(|e| {
        matches!(e, Event::Opened { pid, tid, fds, .. }
            if *pid == run.pid && *tid != run.pid && fds.iter().any(|f| f.fd == thread_fd))
    });
    assert!(
        by_thread,
        "no Opened event from a thread of {} for fd {thread_fd}",
        run.pid
    );
    eprintln!(
        "thread's call site: {:?}",
        site_functions(run.pid, "/dev/urandom")
    );
    assert_eq!(
        model
            .open_fds(run.pid)
            .unwrap()
            .get(thread_fd)
            .unwrap()
            .kind,
        FdKind::File
    );
}

/// Four threads open and close so that closes and creations of one number race (a close frees
/// the number inside the syscall; another thread's open can take it and return first). The
/// table must come out right from the events alone: no /proc correction at all. Both ways:
/// every creation and close sent (the ordering of records), and balanced ones kept in the
/// kernel (a creation that finds a dead entry at its number, a close whose number is taken).
#[test]
#[ignore = "root"]
fn threads_racing_on_descriptor_numbers_leave_an_exact_table() {
    let fixture = common::build_c("fd_race.c", &["-O2", "-g", "-pthread"]);
    for keep in [false, true] {
        let out = out_file(if keep { "fd-race-kept" } else { "fd-race" });
        // Stacks play no part in ordering; without them no event is lost to a full ring here.
        let options = ProbeOptions {
            stack_bytes: 0,
            keep,
            ..ProbeOptions::default()
        };
        let learn = common::learn_env();
        let argv = [
            "env",
            &learn,
            fixture.to_str().unwrap(),
            out.to_str().unwrap(),
        ];
        let run = common::run_traced(&argv, options);
        assert_eq!(run.exit_code, 0, "the fixture failed");
        let listing = read_listing(&out);
        let model = &run.session.model;
        assert_eq!(model.dropped, 0, "records lost");
        let closes = run
            .events
            .iter()
            .filter(|e| matches!(e, Event::Closed { pid, .. } if *pid == run.pid))
            .count();
        let raced = run
            .events
            .iter()
            .filter(|e| matches!(e, Event::Closed { reopened: true, .. }))
            .count();
        let pairs = pairs_of(&run.events, run.pid);
        eprintln!(
            "keep {keep}: {closes} closes sent, {raced} of them raced by a creation of their \
             number; {pairs} created and closed in the kernel"
        );
        assert!(
            closes as u64 + pairs >= 10_000,
            "only {closes} closes and {pairs} pairs seen"
        );
        if keep {
            assert!(pairs > 0, "nothing was kept in the kernel");
        } else {
            assert_eq!(pairs, 0, "kept in the kernel with keeping off");
        }
        let diffs = table_differences(model, run.pid, &listing);
        assert!(diffs.is_empty(), "keep {keep}: {}", diffs.join("\n"));
        assert_no_corrections(
            model.corrections,
            &format!("keep {keep}: corrections were needed"),
        );
    }
}

/// kept.c opens 20,000 times through one call site, keeping every fortieth open, then forks
/// and closes half of what it kept. Nearly all of it happens in the kernel's table (the
/// creations at a site already unwound, their closes, the fork's copy): the tables of parent
/// and child must still come out exactly as their own /proc/self/fd, with no correction, and
/// every creation counted at its site.
#[test]
#[ignore = "root"]
fn descriptors_kept_in_the_kernel_leave_exact_tables_and_counts() {
    let fixture = common::build_c("kept.c", &["-O2", "-g"]);
    let (parent_out, child_out) = (out_file("kept-parent"), out_file("kept-child"));
    let learn = common::learn_env();
    let run = common::run_traced(
        &[
            "env",
            &learn,
            fixture.to_str().unwrap(),
            parent_out.to_str().unwrap(),
            child_out.to_str().unwrap(),
        ],
        ProbeOptions::default(),
    );
    assert_eq!(run.exit_code, 0, "the fixture failed");
    let model = &run.session.model;
    let child = model
        .processes
        .values()
        .find(|p| p.info.ppid == run.pid)
        .expect("the forked child")
        .pid;
    for (pid, out) in [(run.pid, &parent_out), (child, &child_out)] {
        let diffs = table_differences(model, pid, &read_listing(out));
        assert!(diffs.is_empty(), "pid {pid}: {}", diffs.join("\n"));
    }
    assert_no_corrections(model.corrections, "corrections were needed");
    let counters = run.session.counters();
    let pairs = pairs_of(&run.events, run.pid);
    eprintln!(
        "kept {} creations in the kernel, {} closed there ({pairs} of the fixture's)",
        counters.kept, counters.pairs_closed
    );
    assert!(
        pairs > 10_000,
        "only {pairs} pairs closed in the kernel: the site was not recognized"
    );
    let opened: u64 = model
        .sites_of(run.pid)
        .filter(|s| s.kind == FdKind::File)
        .map(|s| s.opened)
        .sum();
    assert!(
        opened >= 20_000,
        "{opened} file creations counted of the fixture's 20,000 and more"
    );
}

/// A shell that runs hundreds of short commands, some of them CPython: when it is done, no
/// kernel map holds a pid any more (an exited pid left there would trace a stranger who gets
/// it next, and fill the map).
#[test]
#[ignore = "root"]
fn short_lived_children_leave_no_stale_kernel_map_entry() {
    let script = "i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done; \
                  for j in 1 2 3; do python3 -c 'open(\"/etc/hostname\")'; done";
    let run = common::run_traced(&["/bin/sh", "-c", script], ProbeOptions::default());
    assert_eq!(run.exit_code, 0);
    let children = run.session.model.processes.len();
    assert!(children > 300, "only {children} processes seen");
    let (traced, python) = run.session.kernel_pids();
    assert!(traced.is_empty(), "still traced: {traced:?}");
    assert!(python.is_empty(), "still in the Python map: {python:?}");
}

#[test]
#[ignore = "root"]
fn failed_outbound_connections_are_named_by_peer_and_cause() {
    check_upstream_failures(ProbeOptions::default());
}

#[test]
#[ignore = "root"]
fn failed_outbound_connections_are_named_on_the_older_kernels_paths() {
    check_upstream_failures(ProbeOptions {
        fallbacks: true,
        ..ProbeOptions::default()
    });
}

#[test]
#[ignore = "root"]
fn outbound_exchanges_that_end_unanswered_are_named() {
    check_exchange_failures(ProbeOptions::default());
}

#[test]
#[ignore = "root"]
fn outbound_exchanges_that_end_unanswered_are_named_on_the_older_kernels_paths() {
    check_exchange_failures(ProbeOptions {
        fallbacks: true,
        ..ProbeOptions::default()
    });
}

/// exchange_fail.c ends TCP exchanges every way an upstream can after the connect (SYNs
/// dropped by a full accept queue, a request never answered, closed early, reset) plus good
/// ones, and reports what its own poll and recv saw and how long each took by its clock:
/// fdtrace's `upstream_failures` must count the same by peer, phase and cause, with durations
/// inside the fixture's, and nothing for the answered requests.
fn check_exchange_failures(options: ProbeOptions) {
    let fixture = common::build_c("exchange_fail.c", &["-O1", "-g", "-pthread"]);
    let out = out_file(&format!("exchange-fail-{}", options.fallbacks));
    let run = common::run_traced(&[fixture.to_str().unwrap(), out.to_str().unwrap()], options);
    assert_eq!(run.exit_code, 0, "exchange_fail failed");
    let text = fs::read_to_string(&out).unwrap();
    let _ = fs::remove_file(&out);
    let truth = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(truth("fillers"), 2, "a backlog of 1 holds two: {text}");
    let report = run.session.report();
    let cases = [
        ("backlog", "connect", "backlog_full", "ETIMEDOUT"),
        ("unanswered", "response", "timeout", "ETIMEDOUT"),
        ("closed", "response", "closed_early", ""),
        ("reset", "response", "reset", "ECONNRESET"),
    ];
    for (name, phase, cause, errno) in cases {
        let expected = truth(name);
        assert!(expected > 0, "the fixture saw no {name}: {text}");
        let peer = format!("127.0.0.1:{}", truth(&format!("{name}_port")));
        let groups: Vec<_> = report
            .upstream_failures
            .iter()
            .filter(|u| u.peer == peer)
            .collect();
        assert_eq!(groups.len(), 1, "{name}: {groups:#?}");
        let u = groups[0];
        assert_eq!(
            (
                u.phase.as_str(),
                u.cause.as_str(),
                u.errno.as_str(),
                u.count
            ),
            (phase, cause, errno, expected),
            "{name}: {u:#?}"
        );
        // The probe's interval lies inside the fixture's, give or take the syscalls around
        // it and fdtrace's whole milliseconds.
        let d = u.duration_ms.expect("durations");
        let (lo, hi) = (
            truth(&format!("{name}_min_ms")),
            truth(&format!("{name}_max_ms")),
        );
        assert!(
            d.min + 5 >= lo && d.max <= hi + 5,
            "{name}: fdtrace {d:?}, the fixture {lo}..{hi} ms"
        );
    }
    let answered = format!("127.0.0.1:{}", truth("answered_port"));
    assert_eq!(truth("answered"), 3, "{text}");
    assert!(
        report.upstream_failures.iter().all(|u| u.peer != answered),
        "answered requests counted: {:#?}",
        report.upstream_failures
    );
}

/// storm.c's 4 threads, `pairs` open/close pairs each as fast as they can, traced with
/// `options`: the report, the table fdtrace had for the storm at its exit, and the fixture's
/// own count of its open descriptors then.
fn storm(pairs: &str, options: ProbeOptions) -> (fdtrace::report::Report, u64, u64) {
    let fixture = common::build_c("storm.c", &["-O2", "-g", "-pthread"]);
    let out = out_file(&format!("storm-{pairs}"));
    let args = [
        fixture.to_str().unwrap(),
        "4",
        pairs,
        "8",
        out.to_str().unwrap(),
    ];
    let run = common::run_traced(&args, options);
    assert_eq!(run.exit_code, 0, "storm failed");
    let text = fs::read_to_string(&out).unwrap();
    let _ = fs::remove_file(&out);
    let truth: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("storm printed {text:?}"));
    let report = run.session.report();
    let open_at_end = report
        .processes
        .iter()
        .find(|p| p.pid == run.pid)
        .expect("the storm's process")
        .open_at_end;
    (report, open_at_end, truth)
}

/// A storm into a 64 KiB ring, far more than the reader can take: events are lost (counted),
/// yet the table at exit must be exactly the fixture's own /proc/self/fd count, from the
/// bitmap the exit probe copies.
#[test]
#[ignore = "root"]
fn a_storm_that_overruns_the_ring_leaves_the_table_exact_at_exit() {
    let (report, open_at_end, truth) = storm(
        "20000",
        ProbeOptions {
            ring_bytes: 64 << 10,
            // Every event sent, as recordings do: kept in the kernel, most of the storm would
            // not cross the ring at all (`cargo xtask bench storm` measures that).
            keep: false,
            ..ProbeOptions::default()
        },
    );
    assert!(
        report.dropped_events > 0,
        "a 64 KiB ring kept up with 160,000 events: the test proves nothing"
    );
    assert_eq!(
        open_at_end, truth,
        "{} events lost; corrections {:?}",
        report.dropped_events, report.corrections
    );
}

/// A smaller storm (40,000 events) into the default 16 MiB ring with 4 KiB stacks, every event
/// sent: as stacked records (4.4 KiB a creation) it is five times the ring. Stacked records
/// fill half the ring within milliseconds; past half the probes send creations without their
/// stacks (counted) rather than lose them, and the stackless rest (456 bytes a pair) fits the
/// other half even if the reader took nothing meanwhile, as in a slow emulated guest. Not one
/// event may be lost, and the table at exit must be exact. (With 400,000 events this
/// debug-built reader lost a fifth even so.)
#[test]
#[ignore = "root"]
fn a_storm_degrades_to_stackless_records_rather_than_losing_events() {
    let (report, open_at_end, truth) = storm(
        "5000",
        ProbeOptions {
            keep: false,
            ..ProbeOptions::default()
        },
    );
    assert!(
        report.lost.stacks_skipped > 0,
        "no stack was skipped: the reader kept up with 40,000 stacked events and the test \
         proves nothing"
    );
    assert_eq!(
        report.dropped_events, 0,
        "events lost although {} stacks were skipped",
        report.lost.stacks_skipped
    );
    assert_eq!(open_at_end, truth, "{:?}", report.corrections);
    assert_no_corrections(report.corrections, "corrections were needed");
}

/// connect_fail.c fails connections every way a proxy's upstream can (TCP refused, blocking
/// and through getsockopt(SO_ERROR); a unix socket missing, forbidden to a child running as
/// nobody, with a full backlog) and counts what it saw: fdtrace's `upstream_failures` must
/// count the same, by peer and cause.
fn check_upstream_failures(options: ProbeOptions) {
    use std::os::unix::fs::PermissionsExt as _;

    let fixture = common::build_c("connect_fail.c", &["-O1", "-g"]);
    let out = out_file(&format!("connect-fail-{}", options.fallbacks));
    let dir = out_file(&format!("connect-fail-dir-{}", options.fallbacks));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    // The child that runs as nobody must reach the sockets in it.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let run = common::run_traced(
        &[
            fixture.to_str().unwrap(),
            out.to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
        options,
    );
    assert_eq!(run.exit_code, 0, "connect_fail failed");
    let text = fs::read_to_string(&out).unwrap();
    let _ = fs::remove_file(&out);
    let _ = fs::remove_dir_all(&dir);
    let truth = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_string()
    };
    let number = |name: &str| truth(name).parse::<u64>().unwrap();
    let report = run.session.report();
    let counted = |cause: &str, peer: &str, errno: &str| -> u64 {
        report
            .upstream_failures
            .iter()
            .filter(|u| u.cause == cause && u.peer == peer)
            .inspect(|u| {
                assert_eq!(u.errno, errno, "{u:?}");
                assert_eq!(u.phase, "connect", "{u:?}");
            })
            .map(|u| u.count)
            .sum()
    };
    let port = truth("port");
    let cases = [
        (
            "refused",
            format!("127.0.0.1:{port}"),
            "ECONNREFUSED",
            number("refused") + number("so_error"),
        ),
        (
            "no_socket",
            format!("unix:{}", truth("no_socket_path")),
            "ENOENT",
            number("no_socket"),
        ),
        (
            "permission",
            format!("unix:{}", truth("permission_path")),
            "EACCES",
            number("permission"),
        ),
        (
            "backlog_full",
            format!("unix:{}", truth("backlog_full_path")),
            "EAGAIN",
            number("backlog_full"),
        ),
    ];
    for (cause, peer, errno, expected) in cases {
        assert!(expected > 0, "the fixture saw no {cause}: {text}");
        assert_eq!(
            counted(cause, &peer, errno),
            expected,
            "{cause} to {peer}: {:#?}",
            report.upstream_failures
        );
    }
    // The child that tried as nobody is named as itself.
    let denied = report
        .upstream_failures
        .iter()
        .find(|u| u.cause == "permission")
        .unwrap();
    assert_ne!(denied.pid, run.pid, "{denied:?}");
}

/// No correction at all, on real CPUs. An emulated guest (`cargo xtask vm-test`) may count a
/// reuse or two, and nothing else, while the tables the tests compare stay exact. There a
/// thread's close can reach the ring long after its number was freed and taken again: the
/// host stalls vCPUs, and 6.12's close path leaves a wider window than 6.1's (of 10,022 closes
/// in `threads_racing`, 871 raced a creation in 6.12's guest, 19 in 6.1's). The stackless
/// storm counted one reuse in every 6.12 guest until 2026-12-08, when the model learnt that
/// two closes of one number can be in flight at once (`two_closes_of_one_number_in_flight_
/// at_once_are_no_correction`); the first guest run after that counted none. The tolerance
/// stays until more runs agree.
fn assert_no_corrections(corrections: Corrections, what: &str) {
    if common::emulated() && corrections.added == 0 && corrections.removed == 0 {
        if corrections.reused > 0 {
            println!("emulated: {} reused numbers counted", corrections.reused);
        }
        assert!(corrections.reused <= 2, "{what}: {corrections:?}");
        return;
    }
    assert_eq!(corrections, Corrections::default(), "{what}");
}
