//! Every component drawn at 80x24 and 160x45 over a model built from synthetic events: a
//! server that accepts a connection, answers, closes it, and leaks the template file it
//! reloads, until accept4 fails with EMFILE. Times and the clock are fixed, so the snapshots
//! are too.

use std::{sync::Arc, time::Duration};

use ratatui::{Terminal, backend::TestBackend, buffer::Buffer, layout::Rect, widgets::Widget};

use super::{
    Action, App, Control, Feed,
    app::{Pane, Popup, SortKey},
    header::Header,
    incidents::{IncidentDetails, IncidentsTable},
    sites::{SiteDetails, SitesTable},
    timeline::TimelineChart,
};
use crate::{
    clock::WallClock,
    container::Container,
    model::{Errno, Event, FdKind, Limit, Model, NewFd, Pid, ProcessInfo},
    probe::ProbeCost,
    report::Report,
    stack::{Frame, Lang},
    tracer::Stacks,
};

const PID: u32 = 4242;
/// 1000 s after boot, in CLOCK_MONOTONIC nanoseconds.
const T0: u64 = 1_000_000_000_000;
const MS: u64 = 1_000_000;
const ACCEPT4: u32 = 288;
const OPENAT: u32 = 257;

struct TestFeed {
    model: Model,
    stacks: Stacks,
    clock: WallClock,
    live: bool,
    controls: Vec<Control>,
    /// What a live session's listener sampling would say of every process.
    listen: (Vec<crate::listeners::ListenQueue>, u64),
}

impl Feed for TestFeed {
    fn pump(&mut self, _timeout: Duration) -> Vec<Event> {
        Vec::new()
    }
    fn listen_queues(&self, _pid: Pid) -> (Vec<crate::listeners::ListenQueue>, u64) {
        self.listen.clone()
    }
    fn model(&self) -> &Model {
        &self.model
    }
    fn stacks(&self) -> &Stacks {
        &self.stacks
    }
    fn clock(&self) -> &WallClock {
        &self.clock
    }
    fn report(&self) -> Report {
        Report::build(&self.model, &self.stacks, &self.clock)
    }
    /// A steady 3 probe runs per millisecond of 800 ns each.
    fn probe_cost(&self) -> Option<ProbeCost> {
        let runs = self.model.last_ns.saturating_sub(T0) / MS * 3;
        self.live.then_some(ProbeCost {
            runs,
            run_time: Duration::from_nanos(runs * 800),
        })
    }
    fn control(&mut self, control: Control) {
        self.controls.push(control);
    }
    fn position(&self) -> String {
        if self.live {
            "live".into()
        } else {
            "replay 25.0s/60.0s x2".into()
        }
    }
    fn running(&self) -> bool {
        true
    }
}

fn frame(function: &str, file: Option<(&str, u32)>, module: &str, addr: u64) -> Frame {
    Frame {
        function: Some(function.into()),
        file: file.map(|f| f.0.into()),
        // Rust's standard library as rustc's debug info names it.
        path: function.starts_with("std::").then(|| {
            format!(
                "/rustc/59807616e/library/std/src/{}",
                file.map_or("", |f| f.0)
            )
        }),
        line: file.map(|f| f.1),
        module: Some(module.into()),
        addr,
        offset: addr & 0xffff,
        lang: Lang::Native,
        inlined: false,
    }
}

fn fd(fd: i32, kind: FdKind, target: &str) -> NewFd {
    NewFd {
        fd,
        kind,
        target: Arc::from(target),
        cloexec: true,
    }
}

/// The leaking server's first `requests` requests, then `failures` failed accepts; the app
/// observes the model every 250 ms of model time, like the run loop.
fn scenario(requests: u64, failures: u64, live: bool) -> (TestFeed, App) {
    scenario_in(requests, failures, live, ProcessInfo::default())
}

/// [`scenario`] with the server placed as `placed` says (`ns_pid` and `container`).
fn scenario_in(requests: u64, failures: u64, live: bool, placed: ProcessInfo) -> (TestFeed, App) {
    let mut stacks = Stacks::default();
    let main = frame(
        "demo_server::main",
        Some(("demo-server.rs", 27)),
        "demo-server",
        0x5555_0000_1234,
    );
    let start = frame(
        "__libc_start_call_main",
        Some(("libc_start_call_main.h", 58)),
        "libc.so.6",
        0x7f00_0002_9d90,
    );
    let leak = stacks.push(vec![
        frame(
            "__libc_open64",
            Some(("open64.c", 41)),
            "libc.so.6",
            0x7f00_0011_4b40,
        ),
        frame(
            "std::fs::OpenOptions::_open",
            Some(("fs.rs", 1175)),
            "demo-server",
            0x5555_0000_8000,
        ),
        frame(
            "demo_server::load_template",
            Some(("demo-server.rs", 58)),
            "demo-server",
            0x5555_0000_2000,
        ),
        frame(
            "demo_server::main",
            Some(("demo-server.rs", 31)),
            "demo-server",
            0x5555_0000_1300,
        ),
        start.clone(),
    ]);
    let accept = stacks.push(vec![
        frame(
            "accept4",
            Some(("accept4.c", 31)),
            "libc.so.6",
            0x7f00_0012_0000,
        ),
        frame(
            "std::net::TcpListener::accept",
            Some(("net.rs", 90)),
            "demo-server",
            0x5555_0000_9000,
        ),
        main,
        start,
    ]);
    let mut feed = TestFeed {
        model: Model::new(),
        stacks,
        clock: WallClock {
            // 1000 s after boot is 2026-11-21T01:48:51Z.
            offset_ns: 1_795_225_731_000_000_000 - i128::from(T0),
        },
        live,
        controls: Vec::new(),
        listen: (Vec::new(), 0),
    };
    let mut events = vec![Event::Attached {
        pid: PID,
        ts: T0,
        info: ProcessInfo {
            ppid: 1,
            comm: "demo-server".into(),
            exe: "/srv/demo/demo-server".into(),
            limit: Limit {
                soft: 128,
                hard: 524_288,
            },
            ..placed
        },
        fds: vec![
            fd(0, FdKind::File, "/dev/pts/3"),
            fd(1, FdKind::File, "/dev/pts/3"),
            fd(2, FdKind::File, "/dev/pts/3"),
            fd(3, FdKind::Socket, "tcp 127.0.0.1:8080 listen"),
        ],
    }];
    let mut ts = T0;
    for n in 0..requests {
        ts = T0 + (n + 1) * 200 * MS;
        let num = 4 + n as i32;
        events.push(Event::Opened {
            pid: PID,
            tid: PID,
            ts,
            syscall: ACCEPT4,
            fds: vec![fd(
                num,
                FdKind::Socket,
                "tcp 127.0.0.1:8080 <- 127.0.0.1:51234",
            )],
            stack: accept,
        });
        events.push(Event::Closed {
            pid: PID,
            ts: ts + 3 * MS + n % 4 * MS,
            fd: num,
            reopened: false,
        });
        events.push(Event::Opened {
            pid: PID,
            tid: PID,
            ts: ts + 8 * MS,
            syscall: OPENAT,
            fds: vec![fd(num, FdKind::File, "/etc/hostname")],
            stack: leak,
        });
    }
    for k in 0..failures {
        ts += 500 * MS;
        events.push(Event::Failed {
            pid: PID,
            tid: PID,
            ts: ts + 123 * MS + k,
            syscall: ACCEPT4,
            errno: Errno::Emfile,
            stack: accept,
        });
        events.push(Event::Listen {
            pid: PID,
            ts: ts + 123 * MS + k,
            listen: crate::model::Listen {
                fd: 3,
                address: "0.0.0.0:8080".into(),
                queued: 1 + k as u32,
                backlog: 128,
            },
        });
    }
    let end = ts + 600 * MS;
    let mut tick = T0 + 1000 * MS;
    let mut app = App::new(!live, false);
    app.log_path = "/tmp/fdtrace-0.log".into();
    let mut observed = T0;
    let mut events = events.into_iter().peekable();
    while tick <= end || events.peek().is_some() {
        let next_event = events.peek().and_then(Event::ts).unwrap_or(u64::MAX);
        if tick <= next_event && tick <= end {
            feed.model.apply(&Event::Tick { ts: tick });
            tick += 1000 * MS;
        } else if let Some(e) = events.next() {
            feed.model.apply(&e);
        }
        // As a session does, between batches: never between a failure and its listen queue,
        // which come from one record.
        let same_record = matches!(events.peek(), Some(Event::Listen { .. }));
        if feed.model.last_ns >= observed + 250 * MS && !same_record {
            app.observe(&feed);
            observed = feed.model.last_ns;
        }
    }
    app.observe(&feed);
    app.refresh(&feed);
    (feed, app)
}

/// The leak has filled the table and accept4 failed four times.
fn leaked() -> (TestFeed, App) {
    scenario(124, 4, true)
}

const SIZES: [(u16, u16); 2] = [(80, 24), (160, 45)];

fn draw(width: u16, height: u16, render: impl Fn(Rect, &mut Buffer)) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| render(f.area(), f.buffer_mut())).unwrap();
    terminal
}

/// Snapshots `render` at both sizes.
fn snapshot(name: &str, render: impl Fn(Rect, &mut Buffer)) {
    for (w, h) in SIZES {
        let terminal = draw(w, h, &render);
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), terminal.backend());
    }
}

fn screen(app: &App, width: u16, height: u16) -> String {
    draw(width, height, |area, buf| app.render(area, buf))
        .backend()
        .to_string()
}

#[test]
fn whole_app() {
    let (_, app) = leaked();
    snapshot("app", |area, buf| (&app).render(area, buf));
}

#[test]
fn whole_app_before_any_event() {
    let app = App::new(false, false);
    snapshot("app_empty", |area, buf| (&app).render(area, buf));
}

#[test]
fn header() {
    let (_, app) = leaked();
    snapshot("header", |area, buf| {
        Header { app: &app }.render(area, buf);
    });
}

/// The server in a container, where it is pid 7: the header says so next to the host pid.
#[test]
fn header_of_a_containerized_process() {
    let id = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";
    let placed = ProcessInfo {
        ns_pid: std::num::NonZeroU32::new(7),
        container: Some(Arc::new(Container::Id(id.into()))),
        ..ProcessInfo::default()
    };
    let (_, app) = scenario_in(124, 4, true, placed);
    snapshot("header_container", |area, buf| {
        Header { app: &app }.render(area, buf);
    });
}

/// A shell's thousand children: the header names the live ones and counts the others, and
/// the history of each goes when it exits.
#[test]
fn exited_children_are_counted_and_forgotten() {
    let (mut feed, mut app) = scenario(10, 0, true);
    for child in 5_000..6_000 {
        let ts = feed.model.last_ns + MS;
        feed.model.apply(&Event::Forked {
            parent: PID,
            child,
            ts,
            shares_table: false,
            ns_pid: None,
            container: None,
        });
        app.observe(&feed);
        feed.model.apply(&Event::Exited {
            pid: child,
            ts: ts + MS,
            code: Some(0),
        });
    }
    feed.model.apply(&Event::Forked {
        parent: PID,
        child: 7_000,
        ts: feed.model.last_ns + MS,
        shares_table: false,
        ns_pid: None,
        container: None,
    });
    app.observe(&feed);
    app.refresh(&feed);
    assert_eq!(app.collector.history_pids(), [PID, 7_000]);
    assert_eq!(app.view.exited, 1_000);
    let top = screen(&app, 160, 45);
    let first = top.lines().next().unwrap();
    assert!(
        first.contains("+1: 7000 demo-server · 1000 exited"),
        "{first}"
    );
}

/// What was missed, and connections closed unanswered at the limit, reach the header: each
/// reason only when it happened.
#[test]
fn the_header_counts_what_was_missed_and_dropped() {
    let (mut feed, mut app) = scenario(10, 1, true);
    app.observe(&feed);
    app.refresh(&feed);
    let quiet = screen(&app, 200, 45);
    assert!(
        !quiet.contains("no stack") && !quiet.contains("closed unanswered"),
        "{quiet}"
    );
    feed.model.apply(&Event::Losses(crate::losses::Losses {
        stacks_unreadable: 3,
        mapping_reports: 2,
        ..crate::losses::Losses::default()
    }));
    let fd = feed.model.open_fds(PID).unwrap().iter().last().unwrap().0;
    feed.model.apply(&Event::Unanswered {
        pid: PID,
        ts: feed.model.last_ns + MS,
        fd,
        request_waiting: true,
    });
    app.observe(&feed);
    app.refresh(&feed);
    let header = screen(&app, 200, 45);
    for expected in ["closed unanswered 1", "no stack 3", "maps lost 2"] {
        assert!(header.contains(expected), "{expected}: {header}");
    }
}

#[test]
fn header_of_a_replay_following_children() {
    let (mut feed, mut app) = scenario(60, 0, false);
    for child in [4243, 4244] {
        feed.model.apply(&Event::Forked {
            parent: PID,
            child,
            ts: feed.model.last_ns + MS,
            shares_table: false,
            ns_pid: None,
            container: None,
        });
    }
    feed.model.apply(&Event::Exited {
        pid: 4244,
        ts: feed.model.last_ns + MS,
        code: Some(0),
    });
    app.observe(&feed);
    app.refresh(&feed);
    snapshot("header_replay", |area, buf| {
        Header { app: &app }.render(area, buf);
    });
}

#[test]
fn timeline() {
    let (_, app) = leaked();
    snapshot("timeline", |area, buf| {
        TimelineChart { app: &app }.render(area, buf);
    });
}

#[test]
fn timeline_while_growing() {
    let (_, app) = scenario(60, 0, true);
    snapshot("timeline_growing", |area, buf| {
        TimelineChart { app: &app }.render(area, buf);
    });
}

#[test]
fn sites_table() {
    let (_, app) = leaked();
    snapshot("sites", |area, buf| {
        SitesTable {
            app: &app,
            focused: true,
            tabs: true,
        }
        .render(area, buf);
    });
}

#[test]
fn site_details() {
    let (_, app) = leaked();
    snapshot("site_details", |area, buf| {
        SiteDetails { app: &app }.render(area, buf);
    });
}

#[test]
fn incidents_table() {
    let (_, app) = leaked();
    snapshot("incidents", |area, buf| {
        IncidentsTable {
            app: &app,
            focused: true,
            tabs: false,
        }
        .render(area, buf);
    });
}

#[test]
fn incident_details() {
    let (_, app) = leaked();
    snapshot("incident_details", |area, buf| {
        IncidentDetails { app: &app }.render(area, buf);
    });
}

#[test]
fn help_popup() {
    let (_, mut app) = leaked();
    app.update(Action::ToggleHelp);
    snapshot("help", |area, buf| (&app).render(area, buf));
}

#[test]
fn replay_help_and_keys() {
    use crossterm::event::{KeyCode, KeyEvent};
    let (mut feed, mut app) = scenario(30, 0, false);
    app.update(Action::ToggleHelp);
    snapshot("help_replay", |area, buf| (&app).render(area, buf));
    app.update(Action::ClosePopup);
    for (code, control) in [
        (KeyCode::Char(' '), Control::TogglePlay),
        (KeyCode::Left, Control::Seek(-5.0)),
        (KeyCode::Right, Control::Seek(5.0)),
        (KeyCode::Char('+'), Control::Speed(2.0)),
        (KeyCode::Char('-'), Control::Speed(0.5)),
    ] {
        let action = app.handle_key(KeyEvent::from(code)).unwrap();
        assert_eq!(action, Action::Replay(control));
        super::perform(&mut app, &mut feed, action, std::path::Path::new("."));
    }
    assert_eq!(feed.controls.len(), 5);
}

#[test]
fn site_details_popup() {
    let (_, mut app) = leaked();
    app.update(Action::ToggleDetails);
    snapshot("site_popup", |area, buf| (&app).render(area, buf));
}

#[test]
fn incident_details_popup() {
    let (_, mut app) = leaked();
    app.update(Action::NextPane);
    app.update(Action::End);
    app.update(Action::ToggleDetails);
    snapshot("incident_popup", |area, buf| (&app).render(area, buf));
}

#[test]
fn incidents_pane_focused() {
    let (_, mut app) = leaked();
    app.update(Action::NextPane);
    snapshot("app_incidents", |area, buf| (&app).render(area, buf));
}

#[test]
fn filter_prompt() {
    let (_, mut app) = leaked();
    app.update(Action::OpenFilter);
    for c in "sock".chars() {
        app.update(Action::FilterChar(c));
    }
    snapshot("filter_prompt", |area, buf| (&app).render(area, buf));
    app.update(Action::FilterApply);
    assert_eq!(app.sites.filter, "sock");
    assert!(app.visible_sites().iter().all(|s| s.kind == FdKind::Socket));
    assert_eq!(
        app.visible_sites().len(),
        2,
        "accepted sockets and the listener"
    );
    app.update(Action::FilterCancel);
    assert!(app.sites.filter.is_empty());
}

#[test]
fn no_color_draws_the_same_text() {
    let (_, app) = leaked();
    let mut plain = App::new(false, true);
    plain.view = app.view.clone();
    plain.collector = std::mem::take(&mut scenario(124, 4, true).1.collector);
    plain.log_path = app.log_path.clone();
    for (w, h) in SIZES {
        assert_eq!(screen(&app, w, h), screen(&plain, w, h));
    }
    let terminal = draw(80, 24, |area, buf| (&plain).render(area, buf));
    let colored = terminal
        .backend()
        .buffer()
        .content()
        .iter()
        .any(|c| c.fg != ratatui::style::Color::Reset || c.bg != ratatui::style::Color::Reset);
    assert!(!colored, "NO_COLOR: no colours at all");
}

#[test]
fn the_leak_leads_and_names_its_function() {
    let (_, app) = leaked();
    let top = app.selected_site().unwrap();
    assert_eq!((top.kind, top.open), (FdKind::File, 124));
    assert!(top.place.contains("load_template"), "{}", top.place);
    assert!(top.growth_per_min > 250.0, "{}", top.growth_per_min);
    let accepts = app
        .view
        .sites
        .iter()
        .find(|s| s.kind == FdKind::Socket && s.origin == crate::model::Origin::Traced)
        .unwrap();
    assert_eq!((accepts.open, accepts.closed), (0, 124));
    // Closed 3 to 6 ms after accept.
    assert!((3.0..=7.0).contains(&accepts.p99_ms.unwrap()));
    assert_eq!(app.view.incidents_total, 4);
    assert_eq!(app.view.focus_process().unwrap().open, 128);
    // The last 5 s: 12 requests, then accept4 failing for 2.6 s.
    assert!(
        (app.view.opens_per_sec - 6.0).abs() < 0.5,
        "{}",
        app.view.opens_per_sec
    );
    assert!(
        (app.view.closes_per_sec - 3.0).abs() < 0.5,
        "{}",
        app.view.closes_per_sec
    );
    let (_, growing) = scenario(60, 0, true);
    // Five requests a second, each opening two descriptors and closing one.
    assert!(
        (growing.view.opens_per_sec - 10.0).abs() < 0.5,
        "{}",
        growing.view.opens_per_sec
    );
    assert!(
        (growing.view.closes_per_sec - 5.0).abs() < 0.5,
        "{}",
        growing.view.closes_per_sec
    );
    let probe = app.view.probe.unwrap();
    assert!((probe.avg_ns - 800.0).abs() < 1.0);
    // 3 runs/ms × 800 ns = 2.4 ms per second.
    assert!(
        (probe.cpu_percent.unwrap() - 0.24).abs() < 0.01,
        "{probe:?}"
    );
    let tl = &app.view.timeline;
    assert_eq!(tl.limit, Some(128));
    assert_eq!(tl.failures.len(), 4);
    assert_eq!(tl.first_label.as_deref(), Some("first EMFILE 01:49:16.423"));
}

#[test]
fn sort_cycles_and_keeps_the_selection_inside() {
    let (_, mut app) = leaked();
    assert_eq!(app.sites.sort, SortKey::Open);
    app.update(Action::CycleSort);
    assert_eq!(app.sites.sort, SortKey::Growth);
    assert!(app.selected_site().unwrap().place.contains("load_template"));
    app.update(Action::CycleSort);
    assert_eq!(app.sites.sort, SortKey::Age);
    // The descriptors open before tracing are the oldest.
    assert_eq!(
        app.selected_site().unwrap().oldest_age_ns,
        Some(app.view.now_ns - T0)
    );
    app.update(Action::CycleSort);
    assert_eq!(app.sites.sort, SortKey::Open);
    app.update(Action::Move(1000));
    assert_eq!(app.sites.selected, app.visible_sites().len() - 1);
    app.update(Action::Home);
    assert_eq!(app.sites.selected, 0);
}

#[test]
fn pause_freezes_the_view_but_keeps_collecting() {
    let (mut feed, mut app) = scenario(60, 0, true);
    app.update(Action::TogglePause);
    let before = screen(&app, 160, 45);
    let ts = feed.model.last_ns + 2000 * MS;
    feed.model.apply(&Event::Opened {
        pid: PID,
        tid: PID,
        ts,
        syscall: OPENAT,
        fds: vec![fd(200, FdKind::Pipe, "pipe:[1]")],
        stack: 1,
    });
    app.observe(&feed);
    app.refresh(&feed);
    let paused = screen(&app, 160, 45);
    assert_eq!(
        before.replace("paused: still collecting", ""),
        paused.replace("paused: still collecting", "")
    );
    app.update(Action::TogglePause);
    app.refresh(&feed);
    assert!(app.view.sites.iter().any(|s| s.kind == FdKind::Pipe));
    assert_eq!(app.collector.incidents.len(), 0);
}

#[test]
fn export_writes_the_report_and_says_where() {
    let (mut feed, mut app) = leaked();
    let dir = std::env::temp_dir().join(format!("fdtrace-tui-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    super::perform(&mut app, &mut feed, Action::Export, &dir);
    let status = app.status.clone().unwrap();
    let path = status.strip_prefix("report written to ").unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(report["schema"], "fdtrace.report/1");
    assert_eq!(report["emfile"].as_array().unwrap().len(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_replay_seeking_back_drops_the_history() {
    let (feed, mut app) = scenario(60, 0, false);
    assert!(!app.view.timeline.points.is_empty());
    let (early, _) = scenario(5, 0, false);
    app.observe(&early);
    app.refresh(&early);
    assert!(
        app.view.timeline.points.len() <= 2,
        "{:?}",
        app.view.timeline.points
    );
    drop(feed);
}

#[test]
fn keys_map_to_actions() {
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    let (_, mut app) = leaked();
    let key = |c| KeyEvent::from(KeyCode::Char(c));
    assert_eq!(app.handle_key(key('q')), Some(Action::Quit));
    assert_eq!(
        app.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        Some(Action::Quit)
    );
    assert_eq!(app.handle_key(key('e')), Some(Action::Export));
    // Replay keys do nothing live.
    assert_eq!(app.handle_key(key(' ')), None);
    assert_eq!(
        app.handle_key(KeyEvent::from(KeyCode::Tab)),
        Some(Action::NextPane)
    );
    app.update(Action::NextPane);
    assert_eq!(app.focus, Pane::Incidents);
    app.update(Action::OpenFilter);
    assert_eq!(app.handle_key(key('q')), Some(Action::FilterChar('q')));
    app.update(Action::FilterCancel);
    app.update(Action::ToggleDetails);
    assert_eq!(app.popup, Some(Popup::Details { scroll: 0 }));
    app.update(Action::Move(3));
    assert_eq!(app.popup, Some(Popup::Details { scroll: 3 }));
    assert_eq!(
        app.handle_key(KeyEvent::from(KeyCode::Esc)),
        Some(Action::ClosePopup)
    );
}

/// A proxy's failed connects get a pane of their own, by peer and cause, most first.
#[test]
fn upstream_failures_get_a_pane() {
    let (mut feed, mut app) = leaked();
    let ts = feed.model.last_ns;
    for (i, (errno, peer)) in [
        (111, "127.0.0.1:8001"),
        (111, "127.0.0.1:8001"),
        (111, "127.0.0.1:8001"),
        (13, "unix:/run/app.sock"),
    ]
    .into_iter()
    .enumerate()
    {
        feed.model.apply(&Event::UpstreamFailed {
            pid: PID,
            ts: ts + i as u64 * MS,
            fd: 12,
            syscall: fdtrace_common::syscalls::GETSOCKOPT,
            errno,
            peer: Arc::from(peer),
        });
    }
    // Two requests nginx gave up on after a second, as the state probe reports them.
    for (i, ms) in [1000, 1010].into_iter().enumerate() {
        feed.model.apply(&Event::UpstreamEnded {
            pid: PID,
            ts: ts + (10 + i as u64) * MS,
            fd: 13,
            ended: crate::model::Ended::Unanswered,
            duration_ns: ms * MS,
            peer: Arc::from("127.0.0.1:8000"),
        });
    }
    app.observe(&feed);
    app.refresh(&feed);
    let rows: Vec<(u64, &str, &str)> = app
        .view
        .upstream
        .iter()
        .map(|r| (r.count, r.peer.as_str(), r.cause.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            (3, "127.0.0.1:8001", "refused"),
            (2, "127.0.0.1:8000", "reply timeout"),
            (1, "unix:/run/app.sock", "permission")
        ]
    );
    let tall = screen(&app, 160, 45);
    assert!(tall.contains("upstream failures 6"), "{tall}");
    assert!(
        tall.contains("refused       127.0.0.1:8001 ECONNREFUSED"),
        "{tall}"
    );
    assert!(
        tall.contains("permission    unix:/run/app.sock EACCES"),
        "{tall}"
    );
    assert!(
        tall.contains("reply timeout 127.0.0.1:8000 ETIMEDOUT after 1.00 s"),
        "{tall}"
    );
    // Too short a screen keeps its two panes.
    assert!(!screen(&app, 80, 20).contains("upstream failures"));
}

/// A full listen queue shows in the header, with when it filled, and the namespace's drops.
#[test]
fn a_full_listen_queue_shows_in_the_header() {
    let (mut feed, mut app) = leaked();
    feed.listen = (
        vec![crate::listeners::ListenQueue {
            address: "127.0.0.1:8000".into(),
            queued: 17,
            backlog: 16,
            full_since: Some(T0 + 1500 * MS),
        }],
        42,
    );
    app.observe(&feed);
    app.refresh(&feed);
    let wide = screen(&app, 200, 45);
    assert!(
        wide.contains("listen 127.0.0.1:8000 17/16 full since 01:48:52.500"),
        "{wide}"
    );
    assert!(wide.contains("listen overflows 42"), "{wide}");
}
