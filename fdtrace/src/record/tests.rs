use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    format::{self, Command, Entry, Header},
    reader::{self, Damage, ReadError},
    replay::Replay,
    v2,
    writer::Recorder,
};
use crate::{
    clock::WallClock,
    container::Container,
    losses::Losses,
    model::{Errno, Event, FdKind, Limit, Model, NewFd, ProcessInfo},
    report::Report,
    stack::{Frame, Lang},
    tracer::Stacks,
};

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fdtrace-test-{}-{name}", std::process::id()))
}

fn header() -> Header {
    Header {
        fdtrace_version: "0.1.0".into(),
        host: "box".into(),
        kernel: "6.1.0".into(),
        start_mono_ns: 1_000_000_000,
        clock: WallClock {
            offset_ns: 1_700_000_000_000_000_000,
        },
        commands: vec![Command {
            pid: 42,
            argv: vec!["/srv/app".into(), "--secret".into()],
            limit: Limit { soft: 64, hard: 64 },
        }],
        redacted: false,
        stack_bytes: 4096,
    }
}

fn frame(function: &str, file: &str, line: u32) -> Frame {
    Frame {
        function: Some(function.into()),
        file: Some(file.into()),
        path: Some(format!("/home/alice/src/{file}")),
        line: Some(line),
        module: Some("app".into()),
        addr: 0x5555_0000_1000 + u64::from(line),
        offset: 0x1000 + u64::from(line),
        lang: Lang::Native,
        inlined: false,
    }
}

fn file(fd: i32, target: &str) -> NewFd {
    NewFd {
        fd,
        kind: FdKind::File,
        target: Arc::from(target),
        cloexec: false,
    }
}

/// A process that leaks a file per iteration, closes another, and hits EMFILE at the end.
fn scenario(iterations: i32) -> (Vec<Frame>, Vec<Frame>, Vec<Event>) {
    let libc = || Frame {
        module: Some("libc.so.6".into()),
        ..frame("open", "open64.c", 41)
    };
    let leak = vec![libc(), frame("load", "app.c", 9)];
    let balanced = vec![libc(), frame("scan", "app.c", 20)];
    let mut events = vec![Event::Attached {
        pid: 42,
        ts: 1_000_000_000,
        info: ProcessInfo {
            ppid: 1,
            comm: "app".into(),
            exe: "/srv/app".into(),
            limit: Limit { soft: 64, hard: 64 },
            ..ProcessInfo::default()
        },
        fds: vec![file(0, "/dev/pts/0"), file(1, "/dev/pts/0")],
    }];
    let mut ts = 1_000_000_000u64;
    for i in 0..iterations {
        ts += 1_000 + (i as u64 * 7919) % 300;
        events.push(Event::Opened {
            pid: 42,
            tid: 42,
            ts,
            syscall: 257,
            fds: vec![file(1000, "/etc/passwd")],
            stack: 2,
        });
        ts += 800 + (i as u64 * 104_729) % 200;
        events.push(Event::Closed {
            pid: 42,
            ts,
            fd: 1000,
            reopened: false,
        });
        if i % 1000 == 0 && i / 1000 < 20 {
            events.push(Event::Opened {
                pid: 42,
                tid: 43,
                ts,
                syscall: 257,
                fds: vec![file(3 + i / 1000, "/home/alice/data.db")],
                stack: 1,
            });
        }
    }
    events.push(Event::Failed {
        pid: 42,
        tid: 42,
        ts: ts + 5,
        syscall: 43,
        errno: Errno::Emfile,
        stack: 2,
    });
    events.push(Event::Lost { count: 3 });
    events.push(Event::Losses(Losses {
        ring_full: 3,
        stacks_unreadable: 2,
        mapping_reports: 1,
        ..Losses::default()
    }));
    events.push(Event::Exited {
        pid: 42,
        ts: ts + 10,
        code: None,
    });
    (leak, balanced, events)
}

fn write(path: &Path, iterations: i32, redact: bool) -> (Report, super::RecordStats) {
    let (leak, balanced, events) = scenario(iterations);
    let mut stacks = Stacks::default();
    let mut model = Model::new();
    let mut recorder = Recorder::create(path, header(), redact).unwrap();
    stacks.push(leak);
    stacks.push(balanced);
    recorder.stacks(&stacks);
    for (i, event) in events.iter().enumerate() {
        model.apply(event);
        recorder.event(event);
        if i % 5_000 == 0 {
            recorder.flush().unwrap();
        }
    }
    model.set_exit_code(42, 3);
    recorder.exit_code(42, 3);
    let stats = recorder.finish().unwrap();
    (Report::build(&model, &stacks, &header().clock), stats)
}

fn replayed(recording: reader::Recording) -> Report {
    let mut replay = Replay::new(recording);
    replay.to_end();
    replay.report()
}

#[test]
fn a_recording_replays_into_the_same_report() {
    let path = temp("roundtrip");
    let (live, _) = write(&path, 3_000, false);
    let recording = reader::open(&path).unwrap();
    assert_eq!(recording.damage, None);
    assert_eq!(recording.header, header());
    let report = replayed(recording);
    assert_eq!(report, live);
    assert_eq!(report.emfile.len(), 1);
    assert_eq!(report.processes[0].exit_code, Some(3));
    assert_eq!(report.dropped_events, 3);
    assert_eq!(
        (report.lost.stacks_unreadable, report.lost.mapping_reports),
        (2, 1)
    );
    assert!(
        report
            .to_text()
            .contains("also missed: 2 stacks unreadable (no frames), 1 mapping reports lost")
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn an_open_close_loop_costs_few_bytes_per_event() {
    let path = temp("compact");
    let (_, stats) = write(&path, 100_000, false);
    let per_event = stats.bytes_per_event();
    eprintln!(
        "{} events, {} bytes: {per_event:.2} bytes/event",
        stats.events, stats.bytes
    );
    assert!(per_event <= 8.0, "{per_event} bytes/event");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_cut_file_reads_up_to_its_last_whole_chunk() {
    let path = temp("cut");
    let (live, _) = write(&path, 12_000, false);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let whole = reader::parse(&bytes).unwrap();
    let mut seen_partial = false;
    // Every prefix through the header, then a spread of cuts (each parse reads the whole
    // prefix): never a panic; before the header ends nothing, after it what was whole.
    let cuts = (0..bytes.len().min(600)).chain((600..bytes.len()).step_by(bytes.len() / 97));
    for len in cuts {
        match reader::parse(&bytes[..len]) {
            Ok(rec) => {
                assert!(matches!(
                    rec.damage,
                    Some(Damage::Cut { .. } | Damage::Unfinished)
                ));
                assert!(rec.entries.len() <= whole.entries.len());
                assert_eq!(rec.entries[..], whole.entries[..rec.entries.len()]);
                if !rec.entries.is_empty() {
                    seen_partial = true;
                }
                // What was whole replays without trouble.
                let _ = replayed(rec);
            }
            Err(ReadError::NoHeader | ReadError::NotRecording) => {}
            Err(e) => panic!("prefix of {len} bytes: {e}"),
        }
    }
    assert!(seen_partial);
    assert_eq!(replayed(whole), live);
}

#[test]
fn damage_in_the_middle_keeps_what_came_before() {
    let path = temp("damaged");
    write(&path, 12_000, false);
    let mut bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let whole = reader::parse(&bytes).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    let rec = reader::parse(&bytes).unwrap();
    assert!(
        matches!(rec.damage, Some(Damage::Corrupt { .. })),
        "{:?}",
        rec.damage
    );
    assert!(rec.entries.len() < whole.entries.len());
}

#[test]
fn junk_and_other_versions_are_refused() {
    for junk in [
        &b""[..],
        b"hello",
        b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0",
        &[0u8; 4096],
    ] {
        assert!(
            matches!(reader::parse(junk), Err(ReadError::NotRecording)),
            "{junk:?}"
        );
    }
    let mut newer = reader::prelude_of_version(format::FORMAT_VERSION + 1).to_vec();
    newer.extend_from_slice(b"whatever comes next");
    let err = reader::parse(&newer).unwrap_err();
    assert!(matches!(err, ReadError::Newer(9)));
    assert_eq!(
        err.to_string(),
        "was written by a newer fdtrace (format 9; this one reads format 8)"
    );
    let mut older = reader::prelude_of_version(1).to_vec();
    older.extend_from_slice(b"closes without reopened");
    let err = reader::parse(&older).unwrap_err();
    assert!(matches!(err, ReadError::Older(1)), "{err}");
    assert_eq!(
        err.to_string(),
        "was written by an older fdtrace (format 1; this one reads formats 2 to 8): report it with that version"
    );
    let path = temp("junk");
    std::fs::write(&path, b"not a recording at all").unwrap();
    let err = reader::open(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{} is not an fdtrace recording", path.display())
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn redacted_recordings_hide_paths_and_arguments() {
    let path = temp("redacted");
    let (live, _) = write(&path, 2_000, true);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let recording = reader::parse(&bytes).unwrap();
    assert!(recording.header.redacted);
    assert!(!recording.header.commands[0].argv[1].contains("secret"));
    assert_ne!(recording.header.host, "box");
    let stacks: Vec<&Vec<Frame>> = recording
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Stack { frames, .. } => Some(frames),
            _ => None,
        })
        .collect();
    assert_eq!(stacks[0][1].function.as_deref(), Some("load"));
    assert_eq!(stacks[0][1].file.as_deref(), Some("app.c"));
    let report = replayed(recording);
    let text = report.to_json();
    assert!(
        !text.contains("alice") && !text.contains("/etc/passwd"),
        "{text}"
    );
    // Same shape as the unredacted report: only names changed.
    assert_eq!(report.sites.len(), live.sites.len());
    assert_eq!(report.sites[0].open, live.sites[0].open);
    assert_eq!(report.sites[0].targets.len(), 1);
}

#[test]
fn exports_agree_with_the_report() {
    let path = temp("export");
    let (live, _) = write(&path, 3_000, false);
    let recording = reader::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut out = Vec::new();
    crate::export::perfetto(&recording, &mut out).unwrap();
    let trace: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let count = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
    // 3000 balanced + 3 leaked + 2 inherited descriptors, each one slice.
    assert_eq!(count("X"), 3_000 + 3 + 2);
    assert_eq!(count("i"), 1);
    assert!(count("C") > 3_000);
    let leaked = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["args"]["end"] == "open at exit")
        .count();
    assert_eq!(leaked, 3 + 2);

    let folded = crate::export::folded(&live);
    assert_eq!(
        folded,
        "app;[open before tracing];[file] 2\napp;load;open;[file] 3\n"
    );
    let mut svg = Vec::new();
    crate::export::flamegraph(&live, &mut svg).unwrap();
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.contains("<svg") && svg.contains("load"));
}

#[test]
fn markdown_folds_stacks_and_tables_blame() {
    let path = temp("markdown");
    let (live, _) = write(&path, 3_000, false);
    std::fs::remove_file(&path).unwrap();
    let md = live.to_markdown();
    assert!(md.contains("| pid | ppid |"), "{md}");
    assert!(md.contains("<details><summary>stack</summary>"), "{md}");
    assert!(
        md.contains("#### EMFILE: `accept` failed in pid 42"),
        "{md}"
    );
    assert!(md.contains("| 3 | file | `load (app.c:9) [app]` |"), "{md}");
}

const ID: &str = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

/// A containerized server (pid 7 in its container) that forks a worker (pid 8 there) and a
/// child /proc could not be read for in time (its pid there unknown), then a shell in a pid
/// namespace of its own with no runtime's id in its cgroup.
fn containerized() -> Vec<Event> {
    let ms = 1_000_000;
    let id = Arc::new(Container::Id(ID.into()));
    let cgroup = Arc::new(Container::Cgroup(
        "/user.slice/user-1000.slice/session-3.scope".into(),
    ));
    let leak = |pid, ts| Event::Opened {
        pid,
        tid: pid,
        ts,
        syscall: 257,
        fds: vec![file(3, "/etc/hostname")],
        stack: 0,
    };
    vec![
        Event::Attached {
            pid: 81_234,
            ts: ms,
            info: ProcessInfo {
                ppid: 81_200,
                ns_pid: std::num::NonZeroU32::new(7),
                comm: "server".into(),
                exe: "/srv/server".into(),
                limit: Limit { soft: 64, hard: 64 },
                container: Some(id.clone()),
            },
            fds: vec![],
        },
        Event::Forked {
            parent: 81_234,
            child: 81_240,
            ts: 2 * ms,
            shares_table: false,
            ns_pid: std::num::NonZeroU32::new(8),
            container: Some(id.clone()),
        },
        Event::Forked {
            parent: 81_234,
            child: 81_241,
            ts: 3 * ms,
            shares_table: false,
            ns_pid: None,
            container: None,
        },
        Event::Attached {
            pid: 90_000,
            ts: 4 * ms,
            info: ProcessInfo {
                ppid: 1,
                ns_pid: std::num::NonZeroU32::new(1),
                comm: "sh".into(),
                exe: "/bin/sh".into(),
                limit: Limit { soft: 64, hard: 64 },
                container: Some(cgroup),
            },
            fds: vec![],
        },
        leak(81_234, 5 * ms),
        leak(81_240, 6 * ms),
        leak(81_241, 7 * ms),
        leak(90_000, 8 * ms),
    ]
}

/// Records `events` (after `stacks`) into a file named `name`; returns the file's bytes and
/// the report of the model that consumed them live.
fn record(name: &str, stacks: &Stacks, events: &[Event]) -> (Vec<u8>, Report) {
    let path = temp(name);
    let mut recorder = Recorder::create(&path, header(), false).unwrap();
    recorder.stacks(stacks);
    let mut model = Model::new();
    for event in events {
        model.apply(event);
        recorder.event(event);
    }
    recorder.finish().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (bytes, Report::build(&model, stacks, &header().clock))
}

#[test]
fn recordings_keep_where_processes_run() {
    let (bytes, live) = record("containers", &Stacks::default(), &containerized());
    let report = replayed(reader::parse(&bytes).unwrap());
    assert_eq!(report, live);

    let placed: Vec<(u32, u32, Option<&str>)> = report
        .processes
        .iter()
        .map(|p| (p.pid, p.ns_pid, p.container.as_deref()))
        .collect();
    assert_eq!(
        placed,
        [
            (81_234, 7, Some(ID)),
            (81_240, 8, Some(ID)),
            // Unknown in its namespace: shown as its pid, in its parent's container.
            (81_241, 81_241, Some(ID)),
            (
                90_000,
                1,
                Some("/user.slice/user-1000.slice/session-3.scope")
            ),
        ]
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["processes"][0]["ns_pid"], 7);
    assert_eq!(json["processes"][0]["container"], ID);
    let text = report.to_text();
    for line in [
        "==81234== FILE DESCRIPTORS: 1 open now (1 opened while traced, 0 inherited) in server [/srv/server], limit 64, peak 1, pid 7 in container 3f2a9c1b7d4e\n",
        "==81240== FILE DESCRIPTORS: 1 open now (1 opened while traced, 0 inherited) in server [/srv/server], limit 64, peak 1, pid 8 in container 3f2a9c1b7d4e\n",
        "==81241== FILE DESCRIPTORS: 1 open now (1 opened while traced, 0 inherited) in server [/srv/server], limit 64, peak 1, in container 3f2a9c1b7d4e\n",
        "==90000== FILE DESCRIPTORS: 1 open now (1 opened while traced, 0 inherited) in sh [/bin/sh], limit 64, peak 1, pid 1 in cgroup /user.slice/user-1000.slice/session-3.scope\n",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }

    // Redacted, the cgroup path is a path; the id stays, to match `docker ps` on the host.
    let path = temp("containers-redacted");
    let mut recorder = Recorder::create(&path, header(), true).unwrap();
    for event in containerized() {
        recorder.event(&event);
    }
    recorder.finish().unwrap();
    let report = replayed(reader::open(&path).unwrap());
    std::fs::remove_file(&path).unwrap();
    assert_eq!(report.processes[0].container.as_deref(), Some(ID));
    let shell = report.processes[3].container.as_deref().unwrap();
    assert!(
        shell.starts_with("/dir-") && shell.ends_with("/session-3.scope"),
        "{shell}"
    );
}

/// Zigzag-encoded delta, as recordings store event times.
fn delta(ns: i64) -> u64 {
    ((ns << 1) ^ (ns >> 63)) as u64
}

#[test]
fn format_2_recordings_still_read_with_processes_on_the_host() {
    let info = v2::ProcessInfo {
        ppid: 1,
        comm: "app".into(),
        exe: "/srv/app".into(),
        limit: Limit { soft: 64, hard: 64 },
    };
    let entries = vec![
        v2::Entry::Event(v2::Event::Attached {
            pid: 42,
            ts: delta(1_000),
            info: info.clone(),
            fds: vec![file(0, "/dev/pts/0")],
        }),
        v2::Entry::Event(v2::Event::Forked {
            parent: 42,
            child: 43,
            ts: delta(1_000),
            shares_table: false,
        }),
        v2::Entry::Event(v2::Event::Exec {
            pid: 43,
            ts: delta(1_000),
            info: v2::ProcessInfo {
                comm: "worker".into(),
                ..info
            },
        }),
        v2::Entry::Event(v2::Event::Opened {
            pid: 43,
            tid: 43,
            ts: delta(1_000),
            syscall: 257,
            fds: vec![file(3, "/etc/passwd")],
            stack: 0,
        }),
        v2::Entry::ExitCode { pid: 42, code: 0 },
        v2::Entry::Finished { events: 4 },
    ];
    let mut bytes = reader::prelude_of_version(2).to_vec();
    bytes.extend(format::encode_chunk(&v2::Chunk::Header(header())).unwrap());
    bytes.extend(format::encode_chunk(&v2::Chunk::Entries(entries)).unwrap());

    let recording = reader::parse(&bytes).unwrap();
    assert_eq!(recording.damage, None);
    assert_eq!(recording.header, header());
    let events: Vec<&Event> = reader::events(&recording).collect();
    assert_eq!(events.len(), 4);
    assert!(matches!(
        events[1],
        Event::Forked {
            child: 43,
            ts: 2_000,
            ns_pid: None,
            container: None,
            ..
        }
    ));
    let report = replayed(recording);
    let placed: Vec<(u32, u32, Option<&str>)> = report
        .processes
        .iter()
        .map(|p| (p.pid, p.ns_pid, p.container.as_deref()))
        .collect();
    assert_eq!(placed, [(42, 42, None), (43, 43, None)]);
    assert_eq!(report.processes[1].comm, "worker");
    let text = report.to_text();
    assert!(
        text.contains(
            "==43== FILE DESCRIPTORS: 2 open now (1 opened while traced, 1 inherited) in worker [/srv/app], limit 64, peak 2\n"
        ),
        "{text}"
    );
}

#[test]
fn format_3_and_4_recordings_still_read() {
    // Formats 4 and 5 only added variants after the previous format's: a file of those reads
    // the same.
    for version in [3u16, 4] {
        let (mut bytes, live) = record("format3", &Stacks::default(), &containerized());
        bytes[format::MAGIC.len()..format::MAGIC.len() + 2].copy_from_slice(&version.to_le_bytes());
        let recording = reader::parse(&bytes).unwrap();
        assert_eq!(recording.damage, None);
        assert_eq!(replayed(recording), live);
    }
}

/// A server at its limit that accepts two connections and closes them unanswered (libuv's
/// reserve-descriptor trick), one with its request waiting; and answers a third.
fn accepted_at_the_limit() -> (Vec<Frame>, Vec<Event>) {
    let libc = Frame {
        module: Some("libc.so.6".into()),
        ..frame("accept4", "accept4.c", 31)
    };
    let stack = vec![
        libc,
        frame("uv__accept", "core.c", 505),
        frame("uv__emfile_trick", "stream.c", 476),
        frame("uv__server_io", "stream.c", 550),
        frame("uv__io_poll", "epoll.c", 370),
    ];
    let socket = |fd| NewFd {
        fd,
        kind: FdKind::Socket,
        target: Arc::from("tcp 127.0.0.1:8000 <- 127.0.0.1:51000"),
        cloexec: true,
    };
    let ms = 1_000_000;
    let mut events = vec![Event::Attached {
        pid: 42,
        ts: ms,
        info: ProcessInfo {
            ppid: 1,
            comm: "uvicorn".into(),
            exe: "/usr/bin/python3.11".into(),
            limit: Limit { soft: 64, hard: 64 },
            ..ProcessInfo::default()
        },
        fds: vec![],
    }];
    for (i, waiting) in [(0u64, Some(false)), (1, Some(true)), (2, None)] {
        let ts = (10 + 10 * i) * ms;
        events.push(Event::Failed {
            pid: 42,
            tid: 42,
            ts,
            syscall: fdtrace_common::syscalls::ACCEPT4,
            errno: Errno::Emfile,
            stack: 1,
        });
        events.push(Event::Opened {
            pid: 42,
            tid: 42,
            ts: ts + 1,
            syscall: fdtrace_common::syscalls::ACCEPT4,
            fds: vec![socket(63)],
            stack: 1,
        });
        if let Some(request_waiting) = waiting {
            events.push(Event::Unanswered {
                pid: 42,
                ts: ts + 2,
                fd: 63,
                request_waiting,
            });
        }
        events.push(Event::Closed {
            pid: 42,
            ts: ts + 3,
            fd: 63,
            reopened: false,
        });
    }
    (stack, events)
}

#[test]
fn connections_closed_unanswered_at_the_limit_are_counted_and_named() {
    let (stack, events) = accepted_at_the_limit();
    let mut stacks = Stacks::default();
    stacks.push(stack);
    let (bytes, live) = record("unanswered", &stacks, &events);
    let report = replayed(reader::parse(&bytes).unwrap());
    assert_eq!(report, live);

    let p = &report.processes[0];
    assert_eq!(
        (p.dropped_at_emfile, p.dropped_at_emfile_request_waiting),
        (2, 1)
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["processes"][0]["dropped_at_emfile"], 2);
    let text = report.to_text();
    assert!(
        text.contains(
            "==42== 2 connections accepted and closed unanswered while the table was full (1 with the request waiting, reset), accepted in uv__accept ← uv__emfile_trick ← uv__server_io; a proxy sees these as \"upstream prematurely closed connection\" or \"connection reset by peer\" (502)\n"
        ),
        "{text}"
    );
    assert!(
        report
            .to_markdown()
            .contains("**uvicorn (pid 42)**: 2 connections")
    );
}

/// The flight recorder's file holds the window only, from a keyframe of the tables at its
/// start: replayed, the EMFILE has the blame the live model gave it.
#[test]
fn a_flight_recording_rebuilds_the_tables_from_its_keyframe() {
    use super::flight::{FlightOptions, FlightRecorder};

    let dir = temp("flight");
    let _ = std::fs::remove_dir_all(&dir);
    let (leak, balanced, mut events) = scenario(3_000);
    // Alive when the recording is written, as a process that just failed is.
    assert!(matches!(events.pop(), Some(Event::Exited { .. })));
    let mut stacks = Stacks::default();
    stacks.push(leak);
    stacks.push(balanced);
    let mut model = Model::new();
    let mut flight = FlightRecorder::new(FlightOptions {
        dir: dir.clone(),
        window: std::time::Duration::from_mins(1),
        max_files: 2,
        stack_bytes: 4096,
    })
    .unwrap();
    let mut observe = flight.observer();
    let cut = events.len() / 2;
    for event in &events[..cut] {
        model.apply(event);
        observe(event);
    }
    flight.sync(&model, &stacks);
    // Twice: the segment written then starts with a keyframe, not with the attach.
    flight.rotate_now(&model);
    flight.rotate_now(&model);
    for event in &events[cut..] {
        model.apply(event);
        observe(event);
    }
    flight.sync(&model, &stacks);
    let clock = header().clock;
    let path = flight
        .trigger(&stacks, clock, 42, "app/x", model.last_ns)
        .unwrap();
    assert!(path.ends_with(format!("fdtrace-app_x-42-{}.fdtrace", 1_700_000_001)));
    let written = flight.finish_all(&model, &stacks);
    assert_eq!(written.len(), 1);
    assert!(written[0].cut_short);

    let recording = reader::open(&path).unwrap();
    assert!(recording.damage.is_none());
    let has_attach_of_42 = recording
        .entries
        .iter()
        .any(|e| matches!(e, Entry::Event(Event::Attached { pid: 42, fds, .. }) if fds.len() == 2));
    assert!(
        has_attach_of_42,
        "the keyframe opens with what was open before tracing"
    );
    let json = |r: &Report| serde_json::from_str::<serde_json::Value>(&r.to_json()).unwrap();
    let (live, replayed) = (
        json(&Report::build(&model, &stacks, &clock)),
        json(&replayed(recording)),
    );
    assert_eq!(replayed["emfile"][0]["blame"], live["emfile"][0]["blame"]);
    assert_eq!(
        replayed["emfile"][0]["open_fds"],
        live["emfile"][0]["open_fds"]
    );
    assert_eq!(
        replayed["processes"][0]["open_at_end"],
        live["processes"][0]["open_at_end"]
    );
    assert_eq!(replayed["emfile"][0]["blame"][0]["open"], 3);

    // At most `max_files` stay: the oldest goes.
    for pid in [43, 44] {
        flight
            .trigger(&stacks, clock, pid, "app", model.last_ns)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    flight.finish_all(&model, &stacks);
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|f| !f.contains("-42-")), "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Failed outbound connections (format 5) replay into the same groups, and `--redact` hides
/// the peers they name.
#[test]
fn upstream_failures_replay_and_redact() {
    let mut events = scenario(10).2;
    events.pop();
    let failed = |ts: u64, errno: u16, peer: &str| Event::UpstreamFailed {
        pid: 42,
        ts,
        fd: 9,
        syscall: fdtrace_common::syscalls::GETSOCKOPT,
        errno,
        peer: Arc::from(peer),
    };
    let last = events.iter().filter_map(Event::ts).max().unwrap();
    events.push(failed(last + 1, 111, "127.0.0.1:8001"));
    events.push(failed(last + 2, 111, "127.0.0.1:8001"));
    events.push(failed(last + 3, 13, "unix:/run/app.sock"));
    for (i, ms) in [990u64, 1_020, 1_005].into_iter().enumerate() {
        events.push(Event::UpstreamEnded {
            pid: 42,
            ts: last + 4 + i as u64,
            fd: 10,
            ended: crate::model::Ended::Unanswered,
            duration_ns: ms * 1_000_000,
            peer: Arc::from("127.0.0.1:8000"),
        });
    }
    let stacks = {
        let (leak, balanced, _) = scenario(0);
        let mut s = Stacks::default();
        s.push(leak);
        s.push(balanced);
        s
    };
    let (bytes, live) = record("upstream", &stacks, &events);
    let groups: Vec<(u64, &str, &str, &str, &str)> = live
        .upstream_failures
        .iter()
        .map(|u| {
            let (peer, phase) = (u.peer.as_str(), u.phase.as_str());
            (u.count, peer, phase, u.cause.as_str(), u.errno.as_str())
        })
        .collect();
    assert_eq!(
        groups,
        [
            (3, "127.0.0.1:8000", "response", "timeout", "ETIMEDOUT"),
            (2, "127.0.0.1:8001", "connect", "refused", "ECONNREFUSED"),
            (1, "unix:/run/app.sock", "connect", "permission", "EACCES")
        ]
    );
    assert!(live.to_text().contains(
        "app pid 42: 2 connects to 127.0.0.1:8001 refused (ECONNREFUSED: nothing listens there"
    ));
    let text = live.to_text();
    assert!(
        text.contains("app pid 42: 3 requests to 127.0.0.1:8000 unanswered, closed by app after 0.99-1.02 s (ETIMEDOUT: the request was sent"),
        "{text}"
    );
    // With nginx's configuration, the timer that ended them.
    let mut compared = live.clone();
    compared.compare_nginx(&crate::nginx::Timeouts::parse("proxy_read_timeout 1s;"));
    assert!(
        compared
            .to_text()
            .contains("nginx's proxy_read_timeout 1s: the app takes longer than nginx waits"),
        "{}",
        compared.to_text()
    );
    let path = temp("upstream-replay");
    std::fs::write(&path, &bytes).unwrap();
    let back = replayed(reader::open(&path).unwrap());
    assert_eq!(back.upstream_failures, live.upstream_failures);

    let mut redacted = Recorder::create(&path, header(), true).unwrap();
    redacted.stacks(&stacks);
    for event in &events {
        redacted.event(event);
    }
    redacted.finish().unwrap();
    let hidden = replayed(reader::open(&path).unwrap());
    assert_eq!(hidden.upstream_failures.len(), 3);
    assert!(
        hidden
            .upstream_failures
            .iter()
            .all(|u| u.peer.starts_with("peer-")),
        "{:?}",
        hidden.upstream_failures
    );
    let _ = std::fs::remove_file(&path);
}
