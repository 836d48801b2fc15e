use super::*;
use crate::container::Container;

const MS: u64 = 1_000_000;
const P: Pid = 100;

fn fd(fd: i32, kind: FdKind, target: &str, cloexec: bool) -> NewFd {
    NewFd {
        fd,
        kind,
        target: Arc::from(target),
        cloexec,
    }
}

fn info(limit: u64) -> ProcessInfo {
    ProcessInfo {
        ppid: 1,
        comm: "t".into(),
        exe: "/t".into(),
        limit: Limit {
            soft: limit,
            hard: limit,
        },
        ..ProcessInfo::default()
    }
}

fn attached(limit: u64) -> Model {
    let mut m = Model::new();
    m.apply(&Event::Attached {
        pid: P,
        ts: MS,
        info: info(limit),
        fds: vec![
            fd(0, FdKind::File, "/dev/null", false),
            fd(1, FdKind::Pipe, "pipe:[1]", false),
        ],
    });
    m
}

fn open(m: &mut Model, pid: Pid, ts: u64, n: i32, stack: StackId, cloexec: bool) {
    m.apply(&Event::Opened {
        pid,
        tid: pid,
        ts,
        syscall: 257,
        fds: vec![fd(n, FdKind::File, "/etc/hostname", cloexec)],
        stack,
    });
}

fn site_open(m: &Model, pid: Pid, stack: StackId) -> u64 {
    m.sites_of(pid)
        .filter(|s| s.stack == stack)
        .map(|s| s.open)
        .sum()
}

#[test]
fn attach_seeds_inherited_descriptors() {
    let m = attached(64);
    assert_eq!(m.open_count(P), 2);
    let origins: Vec<Origin> = m.sites_of(P).map(|s| s.origin).collect();
    assert_eq!(origins, vec![Origin::Inherited, Origin::Inherited]);
}

#[test]
fn open_and_close_track_sites_and_lifetimes() {
    let mut m = attached(64);
    for n in 3..8 {
        open(&mut m, P, 2 * MS, n, 7, false);
    }
    open(&mut m, P, 2 * MS, 8, 9, false);
    m.apply(&Event::Closed {
        pid: P,
        ts: 12 * MS,
        fd: 8,
        reopened: false,
    });
    assert_eq!(site_open(&m, P, 7), 5);
    assert_eq!(site_open(&m, P, 9), 0);
    let balanced = m.sites_of(P).find(|s| s.stack == 9).unwrap();
    assert_eq!((balanced.opened, balanced.closed), (1, 1));
    assert!((balanced.lifetime_ms(0.5).unwrap() - 10.0).abs() < 0.2);
    assert_eq!(m.open_count(P), 7);
    assert_eq!(m.processes[&P].peak_open, 8);
}

#[test]
fn pairs_kept_in_the_kernel_count_at_their_site_as_if_seen() {
    let mut m = attached(64);
    // One descriptor of the site seen (it outlived the kernel's keeping), then 1000 pairs
    // created and closed in the kernel, most of them living about 2 ms.
    open(&mut m, P, 2 * MS, 3, 7, false);
    let pairs = Event::Balanced {
        pid: P,
        ts: 3 * MS,
        stack: 7,
        syscall: fdtrace_common::syscalls::OPENAT,
        count: 1000,
        lifetimes: vec![(2000, 990), (90_000, 10)],
    };
    m.apply(&pairs);
    let site = m.sites_of(P).find(|s| s.stack == 7).unwrap();
    assert_eq!((site.opened, site.closed, site.open), (1001, 1000, 1));
    assert!((site.lifetime_ms(0.5).unwrap() - 2.0).abs() < 0.05);
    assert!((site.lifetime_ms(1.0).unwrap() - 90.0).abs() < 2.0);
    assert_eq!(m.open_count(P), 3);
    // An exited process's pairs change nothing.
    exit(&mut m, P, 4 * MS);
    m.apply(&pairs);
    let site = m.sites_of(P).find(|s| s.stack == 7);
    assert!(site.is_none_or(|s| s.opened == 1001), "{site:?}");
}

#[test]
fn the_kernels_lifetime_buckets_hold_their_middles() {
    use fdtrace_common::{LIFETIME_BUCKETS, lifetime_bucket, lifetime_bucket_middle};
    for micros in 1..5000 {
        assert!(
            lifetime_bucket(micros) >= lifetime_bucket(micros - 1),
            "{micros} us"
        );
    }
    for micros in (0..5000).chain((1..40).map(|s| 1u64 << s)) {
        let b = lifetime_bucket(micros);
        if b < LIFETIME_BUCKETS - 1 {
            assert_eq!(lifetime_bucket(lifetime_bucket_middle(b)), b, "{micros} us");
            // Within a quarter of the value.
            let middle = lifetime_bucket_middle(b) as f64;
            assert!((middle - micros as f64).abs() <= 0.25 * micros.max(1) as f64 + 1.0);
        }
    }
    assert_eq!(lifetime_bucket(u64::MAX), LIFETIME_BUCKETS - 1);
}

#[test]
fn closing_an_unknown_descriptor_changes_nothing() {
    let mut m = attached(64);
    m.apply(&Event::Closed {
        pid: P,
        ts: 2 * MS,
        fd: 40,
        reopened: false,
    });
    assert_eq!(m.open_count(P), 2);
}

#[test]
fn dup2_onto_an_open_descriptor_closes_it() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 3, 7, false);
    m.apply(&Event::Duplicated {
        pid: P,
        tid: P,
        ts: 3 * MS,
        syscall: 33,
        from: 3,
        to: 1,
        cloexec: false,
        stack: 8,
    });
    let table = m.open_fds(P).unwrap();
    assert_eq!(
        table.get(1).unwrap().kind,
        FdKind::File,
        "fd 1 now refers to fd 3's file"
    );
    assert_eq!(&*table.get(1).unwrap().target, "/etc/hostname");
    assert_eq!(m.open_count(P), 3);
    let pipe = m.sites_of(P).find(|s| s.kind == FdKind::Pipe).unwrap();
    assert_eq!((pipe.open, pipe.closed), (0, 1));
    assert_eq!(
        m.corrections.reused, 0,
        "an implicit close by dup2 is not a correction"
    );
    // dup2(fd, fd) is a no-op.
    m.apply(&Event::Duplicated {
        pid: P,
        tid: P,
        ts: 4 * MS,
        syscall: 33,
        from: 3,
        to: 3,
        cloexec: false,
        stack: 8,
    });
    assert_eq!(m.open_count(P), 3);
}

#[test]
fn close_range_closes_or_marks() {
    let mut m = attached(64);
    for n in 3..10 {
        open(&mut m, P, 2 * MS, n, 7, false);
    }
    m.apply(&Event::ClosedRange {
        pid: P,
        ts: 3 * MS,
        first: 5,
        last: 6,
        cloexec_only: false,
        unshare: false,
    });
    assert_eq!(m.open_count(P), 7);
    m.apply(&Event::ClosedRange {
        pid: P,
        ts: 3 * MS,
        first: 7,
        last: u32::MAX,
        cloexec_only: true,
        unshare: false,
    });
    assert_eq!(m.open_count(P), 7);
    m.apply(&Event::Exec {
        pid: P,
        ts: 4 * MS,
        info: info(64),
    });
    let left: Vec<i32> = m.open_fds(P).unwrap().keys().collect();
    assert_eq!(left, vec![0, 1, 3, 4]);
}

#[test]
fn exec_closes_only_cloexec_descriptors() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 3, 7, true);
    open(&mut m, P, 2 * MS, 4, 7, false);
    m.apply(&Event::CloexecSet {
        pid: P,
        fd: 4,
        cloexec: true,
    });
    open(&mut m, P, 2 * MS, 5, 7, false);
    m.apply(&Event::Exec {
        pid: P,
        ts: 3 * MS,
        info: info(64),
    });
    let left: Vec<i32> = m.open_fds(P).unwrap().keys().collect();
    assert_eq!(left, vec![0, 1, 5]);
}

#[test]
fn fork_copies_the_table_with_call_sites() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 3, 7, false);
    m.apply(&Event::Forked {
        parent: P,
        child: 200,
        ts: 3 * MS,
        shares_table: false,
        ns_pid: None,
        container: None,
    });
    open(&mut m, 200, 4 * MS, 4, 8, false);
    m.apply(&Event::Closed {
        pid: P,
        ts: 5 * MS,
        fd: 3,
        reopened: false,
    });
    assert_eq!(m.open_count(200), 4);
    assert_eq!(m.open_count(P), 2);
    assert_eq!(
        site_open(&m, 200, 7),
        1,
        "the child's copy keeps the parent's stack"
    );
    assert_eq!(site_open(&m, P, 7), 0);
}

#[test]
fn children_share_the_container_and_have_pids_of_their_own() {
    let id = Arc::new(Container::Id("3f2a".repeat(16)));
    let ns = NonZeroU32::new;
    let mut m = Model::new();
    m.apply(&Event::Attached {
        pid: P,
        ts: MS,
        info: ProcessInfo {
            ns_pid: ns(7),
            container: Some(id.clone()),
            ..info(64)
        },
        fds: vec![],
    });
    // /proc read for the child: the same container, read again, is the parent's copy.
    m.apply(&Event::Forked {
        parent: P,
        child: 200,
        ts: 2 * MS,
        shares_table: false,
        ns_pid: ns(8),
        container: Some(Arc::new(Container::Id("3f2a".repeat(16)))),
    });
    // Gone before /proc could be read: its pid there is unknown, its container its parent's.
    fork(&mut m, P, 201, 3 * MS);
    let child = &m.processes[&200].info;
    assert_eq!((child.ns_pid, child.ns_pid_or(200)), (ns(8), 8));
    assert!(Arc::ptr_eq(child.container.as_ref().unwrap(), &id));
    let unknown = &m.processes[&201].info;
    assert_eq!((unknown.ns_pid, unknown.ns_pid_or(201)), (None, 201));
    assert_eq!(unknown.container, Some(id.clone()));

    // Exec changes neither: read too late, what was known stays; read, it is taken.
    m.apply(&Event::Exec {
        pid: 200,
        ts: 4 * MS,
        info: ProcessInfo {
            comm: "worker".into(),
            ..ProcessInfo::default()
        },
    });
    let child = &m.processes[&200].info;
    assert_eq!((child.comm.as_str(), child.ns_pid), ("worker", ns(8)));
    assert_eq!(child.container, Some(id));
    m.apply(&Event::Exec {
        pid: 201,
        ts: 5 * MS,
        info: ProcessInfo {
            ns_pid: ns(9),
            ..ProcessInfo::default()
        },
    });
    let unknown = &m.processes[&201].info;
    assert_eq!((unknown.ns_pid, &unknown.container), (ns(9), &None));
}

#[test]
fn clone_files_shares_one_table() {
    let mut m = attached(64);
    m.apply(&Event::Forked {
        parent: P,
        child: 200,
        ts: 3 * MS,
        shares_table: true,
        ns_pid: None,
        container: None,
    });
    open(&mut m, 200, 4 * MS, 3, 8, false);
    assert_eq!(m.open_count(P), 3);
    m.apply(&Event::Exited {
        pid: 200,
        ts: 5 * MS,
        code: Some(0),
    });
    assert_eq!(m.open_count(P), 3, "the table lives on with its other user");
    m.apply(&Event::Closed {
        pid: P,
        ts: 6 * MS,
        fd: 3,
        reopened: false,
    });
    assert_eq!(m.open_count(P), 2);
    assert_eq!(
        m.open_count(200),
        3,
        "what 200 held at its exit is kept for the report"
    );
}

#[test]
fn exit_snapshots_the_table() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 3, 7, false);
    m.apply(&Event::Exited {
        pid: P,
        ts: 3 * MS,
        code: None,
    });
    m.set_exit_code(P, 3);
    let p = &m.processes[&P];
    let exit = p.exit.as_ref().unwrap();
    assert_eq!(exit.code, Some(3));
    assert_eq!(exit.open_at_exit.len(), 3);
    assert_eq!(site_open(&m, P, 7), 0, "nothing is open in a dead process");
    let site = m.sites_of(P).find(|s| s.stack == 7).unwrap();
    assert_eq!(
        (site.opened, site.closed),
        (1, 0),
        "exit is not the program closing"
    );
}

#[test]
fn emfile_blames_the_holders_at_that_instant() {
    let mut m = attached(9);
    for n in 3..9 {
        open(&mut m, P, 2 * MS, n, 7, false);
    }
    open(&mut m, P, 2 * MS, 9, 8, false);
    m.apply(&Event::Failed {
        pid: P,
        tid: P + 1,
        ts: 3 * MS,
        syscall: 288,
        errno: Errno::Emfile,
        stack: 9,
    });
    for n in 3..9 {
        m.apply(&Event::Closed {
            pid: P,
            ts: 4 * MS,
            fd: n,
            reopened: false,
        });
    }
    let inc = &m.incidents[0];
    assert_eq!((inc.open_fds, inc.limit, inc.tid), (9, 9, P + 1));
    let top = &m.sites[inc.blame[0].0];
    assert_eq!((top.stack, inc.blame[0].1), (7, 6));
    assert_eq!(
        inc.blame.len(),
        4,
        "stack 7, stack 8 and the two inherited descriptors"
    );
}

#[test]
fn reconciliation_corrects_only_what_persists() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 3, 7, false);
    // /proc lacks fd 3 and shows fd 5 that no event created.
    let listing = vec![
        fd(0, FdKind::File, "/dev/null", false),
        fd(1, FdKind::Pipe, "pipe:[1]", false),
        fd(5, FdKind::Socket, "socket:[9]", false),
    ];
    m.apply(&Event::Reconciled {
        pid: P,
        ts: 3 * MS,
        fds: listing.clone(),
    });
    assert_eq!(
        m.open_count(P),
        3,
        "one listing is not enough: events may be in flight"
    );
    m.apply(&Event::Reconciled {
        pid: P,
        ts: 4 * MS,
        fds: listing,
    });
    let left: Vec<i32> = m.open_fds(P).unwrap().keys().collect();
    assert_eq!(left, vec![0, 1, 5]);
    assert_eq!(
        m.corrections,
        Corrections {
            added: 1,
            removed: 1,
            reused: 0
        }
    );
    assert!(
        m.sites_of(P)
            .any(|s| s.origin == Origin::Reconciled && s.open == 1)
    );
}

#[test]
fn a_discrepancy_that_resolves_is_not_corrected() {
    let mut m = attached(64);
    let listing = vec![
        fd(0, FdKind::File, "/dev/null", false),
        fd(1, FdKind::Pipe, "pipe:[1]", false),
        fd(3, FdKind::File, "/x", false),
    ];
    m.apply(&Event::Reconciled {
        pid: P,
        ts: 3 * MS,
        fds: listing.clone(),
    });
    open(&mut m, P, 3 * MS, 3, 7, false); // the creation was in flight
    m.apply(&Event::Reconciled {
        pid: P,
        ts: 4 * MS,
        fds: listing,
    });
    assert_eq!(m.corrections, Corrections::default());
}

#[test]
fn growth_and_forecast() {
    let mut m = attached(1000);
    let mut n = 3;
    for sec in 1..=20u64 {
        for _ in 0..10 {
            open(&mut m, P, sec * 1000 * MS, n, 7, false);
            n += 1;
        }
        m.apply(&Event::Tick {
            ts: sec * 1000 * MS,
        });
    }
    let growth = m.processes[&P].growth_per_min();
    assert!((growth - 600.0).abs() < 1.0, "{growth}");
    let site = m.sites_of(P).find(|s| s.stack == 7).unwrap();
    assert!((m.site_growth_per_min(site) - 600.0).abs() < 1.0);
    // 202 open, 798 to go at 10/s.
    let eta = m.forecast_secs(P).unwrap();
    assert!((eta - 79.8).abs() < 0.5, "{eta}");
}

#[test]
fn pid_reuse_after_exit_starts_fresh() {
    let mut m = attached(64);
    m.apply(&Event::Forked {
        parent: P,
        child: 200,
        ts: 2 * MS,
        shares_table: false,
        ns_pid: None,
        container: None,
    });
    m.apply(&Event::Exited {
        pid: 200,
        ts: 3 * MS,
        code: Some(0),
    });
    m.apply(&Event::Forked {
        parent: P,
        child: 200,
        ts: 4 * MS,
        shares_table: false,
        ns_pid: None,
        container: None,
    });
    assert!(m.processes[&200].alive());
    assert_eq!(m.open_count(200), 2);
}

fn close(m: &mut Model, ts: u64, n: i32, reopened: bool) {
    m.apply(&Event::Closed {
        pid: P,
        ts,
        fd: n,
        reopened,
    });
}

/// Thread A closes 5 while thread B opens and gets 5: B's creation can reach sys_exit, and so
/// the model, before A's close does.
#[test]
fn a_close_racing_with_a_creation_of_its_number_keeps_the_new_descriptor() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 5, 7, false);
    // B's creation first, then A's close, which saw the slot taken again.
    open(&mut m, P, 3 * MS, 5, 9, false);
    close(&mut m, 3 * MS + 1, 5, true);
    assert_eq!(site_open(&m, P, 9), 1, "the new descriptor survives");
    assert_eq!(site_open(&m, P, 7), 0);
    // The other order: the close first (it also saw the slot taken), then the creation.
    close(&mut m, 4 * MS, 5, true);
    open(&mut m, P, 4 * MS + 1, 5, 11, false);
    assert_eq!(site_open(&m, P, 9), 0);
    assert_eq!(site_open(&m, P, 11), 1);
    m.apply(&Event::Tick { ts: 10_000 * MS });
    assert_eq!(m.open_count(P), 3);
    assert_eq!(m.corrections.reused, 0, "both orders are exact");
}

/// Two closes of 5 in flight at once: A closes 5, B opens 5 and closes it, C opens 5, and only
/// then do A's and B's closes return (both see the slot taken by C's). Each creation displaced
/// a descriptor whose close was coming: nothing was missed. (6.12 under emulation returns
/// closes this late about one time in ten; the model once counted the second displacement
/// as a missed close.)
#[test]
fn two_closes_of_one_number_in_flight_at_once_are_no_correction() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 5, 7, false);
    open(&mut m, P, 3 * MS, 5, 9, false);
    open(&mut m, P, 4 * MS, 5, 11, false);
    close(&mut m, 5 * MS, 5, true);
    close(&mut m, 5 * MS + 1, 5, true);
    m.apply(&Event::Tick { ts: 5_000 * MS });
    assert_eq!(m.corrections.reused, 0, "both displacements were explained");
    assert_eq!(site_open(&m, P, 11), 1, "C's descriptor survives");
    assert_eq!((site_open(&m, P, 7), site_open(&m, P, 9)), (0, 0));
    assert_eq!(m.open_count(P), 3, "the table's two first, and 5");
    // Nothing is left waiting to explain a later displacement: a creation of 5 over C's, whose
    // close never comes, is still a correction.
    open(&mut m, P, 5_001 * MS, 5, 13, false);
    m.apply(&Event::Tick { ts: 7_000 * MS });
    assert_eq!(m.corrections.reused, 1);
}

#[test]
fn a_displaced_descriptor_whose_close_never_comes_is_a_correction() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 5, 7, false);
    open(&mut m, P, 3 * MS, 5, 9, false);
    m.apply(&Event::Tick { ts: 500 * MS });
    assert_eq!(m.corrections.reused, 0, "the racing close may still come");
    m.apply(&Event::Tick { ts: 2_000 * MS });
    assert_eq!(m.corrections.reused, 1);
    assert_eq!(site_open(&m, P, 9), 1);
    // A close that found the number free closes the current descriptor, whatever came before.
    open(&mut m, P, 2_001 * MS, 5, 11, false);
    close(&mut m, 2_002 * MS, 5, false);
    assert_eq!(m.open_count(P), 2);
    m.apply(&Event::Tick { ts: 4_000 * MS });
    assert_eq!(m.corrections.reused, 2);
}

/// A closes 5; B opens 5 and closes it again, both before A's close returns and looks at the
/// slot (empty by then): A's close comes last, finds nothing to close, and explains B's
/// displacement of A's descriptor.
#[test]
fn a_late_close_after_the_new_descriptor_came_and_went_is_exact() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 5, 7, false);
    open(&mut m, P, 3 * MS, 5, 9, false);
    close(&mut m, 3 * MS + 1, 5, false);
    close(&mut m, 3 * MS + 2, 5, false);
    m.apply(&Event::Tick { ts: 5_000 * MS });
    assert_eq!(m.open_count(P), 2);
    assert_eq!(m.corrections.reused, 0);
    let sites: Vec<(u64, u64)> = m
        .sites_of(P)
        .filter(|s| s.stack == 7 || s.stack == 9)
        .map(|s| (s.opened, s.closed))
        .collect();
    assert_eq!(sites, vec![(1, 1), (1, 1)]);
}

fn fork(m: &mut Model, parent: Pid, child: Pid, ts: u64) {
    m.apply(&Event::Forked {
        parent,
        child,
        ts,
        shares_table: false,
        ns_pid: None,
        container: None,
    });
}

fn exit(m: &mut Model, pid: Pid, ts: u64) {
    m.apply(&Event::Exited {
        pid,
        ts,
        code: Some(0),
    });
}

/// A shell running short commands: each child copies the shell's descriptors, execs, opens
/// and closes a few files of its own and exits with only stdio open.
fn run_child(m: &mut Model, child: Pid, ts: u64) {
    fork(m, P, child, ts);
    m.apply(&Event::Exec {
        pid: child,
        ts: ts + 1,
        info: ProcessInfo {
            comm: "true".into(),
            ..info(64)
        },
    });
    for (n, stack) in [(3, 20), (3, 21)] {
        m.apply(&Event::Opened {
            pid: child,
            tid: child,
            ts: ts + 2,
            syscall: 257,
            fds: vec![fd(n, FdKind::File, "/etc/ld.so.cache", true)],
            stack,
        });
        m.apply(&Event::Closed {
            pid: child,
            ts: ts + 3,
            fd: n,
            reopened: false,
        });
    }
    exit(m, child, ts + 4);
}

#[test]
fn a_clean_child_leaves_a_count_and_no_sites() {
    let mut m = attached(64);
    let sites_before = m.sites.len();
    for i in 0..1_000 {
        run_child(&mut m, 1_000 + i, (10 + u64::from(i)) * MS);
    }
    assert_eq!(
        m.sites.len(),
        sites_before,
        "each child's sites went with it"
    );
    assert_eq!(m.exited_count(), 1_000);
    let child = &m.processes[&1_500];
    let exit = child.exit.as_ref().unwrap();
    assert!(exit.clean());
    assert_eq!(exit.open, 2);
    assert_eq!(m.open_count(1_500), 2, "the count stays");
    assert!(m.open_fds(1_500).unwrap().is_empty(), "the descriptors go");
    assert_eq!(m.sites_of(1_500).count(), 0);
    assert_eq!(m.tables.len(), 1, "only the shell's table is left");
    assert!(m.site_index.len() <= sites_before);
    // Opens and closes are still counted, for the rates.
    assert_eq!(m.opened_total, 2 + 1_000 * 4);
    assert_eq!(m.closed_total, 1_000 * 2);
}

#[test]
fn a_child_that_exits_with_a_descriptor_open_keeps_it_and_its_site() {
    let mut m = attached(64);
    fork(&mut m, P, 200, 2 * MS);
    open(&mut m, 200, 3 * MS, 3, 7, false);
    open(&mut m, 200, 3 * MS, 4, 8, false);
    m.apply(&Event::Closed {
        pid: 200,
        ts: 4 * MS,
        fd: 4,
        reopened: false,
    });
    exit(&mut m, 200, 5 * MS);
    let exit = m.processes[&200].exit.as_ref().unwrap();
    assert!(!exit.clean());
    let table = m.open_fds(200).unwrap();
    assert_eq!(table.keys().collect::<Vec<_>>(), [0, 1, 3]);
    let site = &m.sites[table.get(3).unwrap().site()];
    assert_eq!(
        (site.pid, site.stack, site.opened, site.open),
        (200, 7, 1, 0)
    );
    let kept: Vec<StackId> = m.sites_of(200).map(|s| s.stack).collect();
    assert_eq!(
        kept.len(),
        3,
        "the two inherited sites and stack 7's; stack 8's closed everything and went"
    );
    assert!(!kept.contains(&8));
}

#[test]
fn exited_processes_past_the_bound_are_folded_oldest_first() {
    let mut m = attached(64);
    let leaky: Pid = 1_000;
    fork(&mut m, P, leaky, MS);
    open(&mut m, leaky, 2 * MS, 3, 7, false);
    exit(&mut m, leaky, 3 * MS);
    let extra = 20u32;
    for i in 0..MAX_EXITED_KEPT as u32 + extra {
        run_child(&mut m, 2_000 + i, (10 + u64::from(i)) * MS);
    }
    assert_eq!(m.exited_kept, MAX_EXITED_KEPT);
    assert_eq!(
        m.exited_count(),
        MAX_EXITED_KEPT as u64 + u64::from(extra) + 1
    );
    assert!(!m.processes.contains_key(&leaky), "the oldest went first");
    assert!(!m.processes.contains_key(&2_000));
    let f = &m.folded;
    assert_eq!(f.processes, u64::from(extra) + 1);
    assert_eq!(f.clean.get("true"), Some(&u64::from(extra)));
    let groups: Vec<(&FoldedKey, &FoldedGroup)> = f.open_at_exit.iter().collect();
    assert_eq!(groups.len(), 3, "stdin, stdout and stack 7: {groups:?}");
    let own = f
        .open_at_exit
        .iter()
        .find(|(k, _)| k.origin == Origin::Traced)
        .unwrap();
    assert_eq!((own.0.stack, own.1.open, own.1.processes), (7, 1, 1));
    // The leaky child's sites were freed with its record.
    assert!(m.sites.iter().all(|(_, s)| s.pid != leaky));
}

#[test]
fn a_reused_pid_starts_fresh_and_the_old_process_is_counted() {
    let mut m = attached(64);
    fork(&mut m, P, 200, 2 * MS);
    open(&mut m, 200, 3 * MS, 3, 7, false);
    exit(&mut m, 200, 4 * MS);
    fork(&mut m, P, 200, 5 * MS);
    open(&mut m, 200, 6 * MS, 3, 7, false);
    assert!(m.processes[&200].alive());
    let site = m.sites_of(200).find(|s| s.stack == 7).unwrap();
    assert_eq!(
        (site.opened, site.open),
        (1, 1),
        "not the old process's site"
    );
    assert_eq!(m.folded.processes, 1);
    assert_eq!(m.exited_count(), 1);
    // A fork record for a pid we still think alive: its exit was missed.
    fork(&mut m, P, 200, 7 * MS);
    assert_eq!(m.open_count(200), 2);
    assert_eq!(m.folded.processes, 2);
    assert_eq!(site_open(&m, 200, 7), 0);
    assert!(m.sites.iter().all(|(_, s)| s.stack != 7), "{:?}", m.sites);
}

#[test]
fn sites_an_incident_blames_outlive_their_process() {
    let mut m = attached(4);
    fork(&mut m, P, 200, 2 * MS);
    open(&mut m, 200, 3 * MS, 2, 7, false);
    open(&mut m, 200, 3 * MS, 3, 7, false);
    m.apply(&Event::Failed {
        pid: 200,
        tid: 200,
        ts: 4 * MS,
        syscall: 257,
        errno: Errno::Emfile,
        stack: 9,
    });
    exit(&mut m, 200, 5 * MS);
    fork(&mut m, P, 200, 6 * MS);
    let blame = &m.incidents[0].blame;
    assert_eq!(blame.len(), 3);
    let top = &m.sites[blame[0].0];
    assert_eq!((top.pid, top.stack, blame[0].1), (200, 7, 2));
}

#[test]
fn a_site_in_a_shared_table_lives_until_its_last_descriptor_closes() {
    let mut m = attached(64);
    m.apply(&Event::Forked {
        parent: P,
        child: 200,
        ts: 2 * MS,
        shares_table: true,
        ns_pid: None,
        container: None,
    });
    open(&mut m, 200, 3 * MS, 3, 7, false);
    exit(&mut m, 200, 4 * MS);
    assert_eq!(m.open_count(P), 3);
    let id = m.open_fds(P).unwrap().get(3).unwrap().site();
    assert_eq!(m.sites[id].pid, 200);
    m.apply(&Event::Exec {
        pid: 200,
        ts: 4 * MS,
        info: info(64),
    });
    close(&mut m, 5 * MS, 3, false);
    assert_eq!(m.open_count(P), 2);
    assert_eq!(
        m.sites.get(id).map(|s| s.pid),
        Some(200),
        "200's snapshot still refers to it"
    );
    fork(&mut m, P, 200, 6 * MS);
    assert!(m.sites.iter().all(|(_, s)| s.stack != 7), "{:?}", m.sites);
}

#[test]
fn unsharing_a_table_counts_the_copies() {
    let mut m = attached(64);
    m.apply(&Event::Forked {
        parent: P,
        child: 200,
        ts: 2 * MS,
        shares_table: true,
        ns_pid: None,
        container: None,
    });
    open(&mut m, P, 3 * MS, 3, 7, false);
    m.apply(&Event::ClosedRange {
        pid: 200,
        ts: 4 * MS,
        first: 10,
        last: 20,
        cloexec_only: false,
        unshare: true,
    });
    assert_eq!(site_open(&m, P, 7), 2, "one descriptor in each table");
    close(&mut m, 5 * MS, 3, false);
    exit(&mut m, 200, 6 * MS);
    assert_eq!(site_open(&m, P, 7), 0);
}

#[test]
fn a_site_takes_no_lifetime_memory_until_something_closes() {
    let mut m = attached(64);
    open(&mut m, P, 2 * MS, 3, 7, false);
    let site = m.sites_of(P).find(|s| s.stack == 7).unwrap();
    assert_eq!(site.lifetime_ms(0.5), None);
    close(&mut m, 12 * MS, 3, false);
    let site = m.sites_of(P).find(|s| s.stack == 7).unwrap();
    assert!((site.lifetime_ms(0.5).unwrap() - 10.0).abs() < 0.1);
}

#[test]
fn pids_that_come_back_before_the_bound_leave_no_trail() {
    let mut m = attached(64);
    // A pid_max of 100: every pid comes back long before MAX_EXITED_KEPT exits.
    for i in 0..3 * MAX_EXITED_KEPT as u32 {
        run_child(&mut m, 1_000 + i % 100, (10 + u64::from(i)) * MS);
    }
    assert_eq!(m.exited_kept, 100);
    assert!(m.exit_order.len() <= 2 * MAX_EXITED_KEPT + 1);
    assert_eq!(m.exited_count(), 3 * MAX_EXITED_KEPT as u64);
}

#[test]
fn exited_records_are_bounded_in_bytes_too() {
    let mut m = attached(64);
    for i in 0..MAX_EXITED_KEPT as u32 {
        let child = 1_000 + i;
        let ts = (10 + u64::from(i)) * MS;
        fork(&mut m, P, child, ts);
        open(&mut m, child, ts + 1, 3, 7, false);
        open(&mut m, child, ts + 1, 4, 8, false);
        exit(&mut m, child, ts + 2);
    }
    assert!(m.exited_bytes <= MAX_EXITED_BYTES);
    assert!(m.exited_kept < MAX_EXITED_KEPT, "{}", m.exited_kept);
    assert_eq!(m.exited_count(), MAX_EXITED_KEPT as u64);
    let kept: usize = m
        .processes
        .values()
        .filter_map(|p| p.exit.as_ref())
        .map(|e| e.bytes as usize)
        .sum();
    assert_eq!(kept, m.exited_bytes);
}

/// The kernel's table at exit wins over events that lost some: a close never seen (3), a
/// creation never seen (9), and numbers past what the bitmap covers left as they were (70).
#[test]
fn the_table_at_exit_corrects_lost_events() {
    let mut m = attached(1024);
    for n in [3, 4, 70] {
        open(&mut m, P, 2 * MS, n, 1, false);
    }
    // Open at exit: 0, 1, 4 and 9, in a bitmap covering descriptors 0 to 63.
    let open_fds: u16 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 9);
    m.apply(&Event::ExitTable {
        pid: P,
        ts: 3 * MS,
        covered: 64,
        open: open_fds.to_le_bytes().to_vec(),
    });
    let mut left: Vec<i32> = m.open_fds(P).unwrap().iter().map(|(n, _)| n).collect();
    left.sort_unstable();
    assert_eq!(left, [0, 1, 4, 9, 70]);
    assert_eq!((m.corrections.added, m.corrections.removed), (1, 1));
    m.apply(&Event::Exited {
        pid: P,
        ts: 3 * MS,
        code: Some(0),
    });
    assert!(!m.processes[&P].alive());
}
