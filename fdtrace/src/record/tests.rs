use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    format::{Command, Entry, Header},
    reader::{self, Damage, ReadError},
    replay::Replay,
    writer::Recorder,
};
use crate::{
    clock::WallClock,
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
    let mut newer = reader::prelude_of_version(super::format::FORMAT_VERSION + 1).to_vec();
    newer.extend_from_slice(b"whatever comes next");
    let err = reader::parse(&newer).unwrap_err();
    assert!(matches!(err, ReadError::Newer(3)));
    assert_eq!(
        err.to_string(),
        "was written by a newer fdtrace (format 3; this one reads format 2)"
    );
    let mut older = reader::prelude_of_version(1).to_vec();
    older.extend_from_slice(b"closes without reopened");
    let err = reader::parse(&older).unwrap_err();
    assert!(matches!(err, ReadError::Older(1)), "{err}");
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
