//! The live terminal UI, for a running session and for a recording alike.
//!
//! # Structure (after kxxt/tracexec)
//! ```text
//!  Feed ──pump──▶ Collector (history, incident rows, stack cache; always collecting)
//!                     │ refresh (unless paused)
//!                     ▼
//!  terminal keys ─▶ Action ─▶ App::update ─▶ App { View, pane states } ─▶ impl Widget for &App
//! ```
//! - A [`Feed`] is where events come from: [`Session`] live, or a recording in `fdtrace
//!   replay`. The UI never learns which beyond [`Feed::position`] and [`Feed::probe_cost`].
//! - The model stays the source of truth. [`app::App::observe`] samples it after every pump
//!   (the timeline, rates and probe cost need history the model does not keep), and
//!   [`app::App::refresh`] derives the [`view::View`] the widgets draw from. Pausing stops
//!   only the refresh: collection goes on, the view is frozen.
//! - Keys become [`app::Action`]s; only `App::update` mutates state. The actions that need
//!   I/O (writing a report, replay controls) are carried out here in [`run`], never in render.
//! - Each component is a widget over the view with its `*State` in the app, drawn alone by
//!   the snapshot tests at 80x24 and 160x45.
//!
//! # Implementing a feed for a recording
//! `pump(timeout)` returns the events applied to the model since the last call, waiting at
//! most `timeout` (the UI calls it every ~50 ms and redraws at 4 Hz). `control` gets
//! [`Control::TogglePlay`] (space), [`Control::Seek`] (←/→, ±5 s) and [`Control::Speed`]
//! (+/-: ×2 and ×0.5). A backward seek may rebuild the model from the start: the UI notices
//! (`first_ns` changes or `last_ns` goes back) and drops its history. `running` turns false
//! at the end of the recording; the UI then stays up showing the final state until `q`.

mod app;
mod format;
mod header;
mod incidents;
pub mod logfile;
mod popups;
mod sites;
mod terminal;
mod theme;
mod timeline;
mod upstream;
mod view;

#[cfg(test)]
mod tests;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use crossterm::event::{self as term, Event as TermEvent, KeyEventKind};

pub use app::{Action, App};
pub use logfile::log_path;

use crate::{
    clock::WallClock,
    model::{Event, Model},
    probe::ProbeCost,
    report::Report,
    session::Session,
    tracer::Stacks,
};

/// A source of events for the UI: a live session or a recording.
pub trait Feed {
    /// Consumes what arrived, waiting up to `timeout`; returns the new events.
    fn pump(&mut self, timeout: Duration) -> Vec<Event>;
    fn model(&self) -> &Model;
    fn stacks(&self) -> &Stacks;
    fn clock(&self) -> &WallClock;
    fn report(&self) -> Report;
    /// Probe cost so far when live; None for a recording.
    fn probe_cost(&self) -> Option<ProbeCost> {
        None
    }
    /// The listen queues of `pid` at the last sample, and the connections its network
    /// namespace's full queues dropped since (live only).
    fn listen_queues(&self, _pid: crate::model::Pid) -> (Vec<crate::listeners::ListenQueue>, u64) {
        (Vec::new(), 0)
    }
    /// Replay controls (ignored live).
    fn control(&mut self, _control: Control) {}
    /// "live", or e.g. "replay 12.3s/60.0s x2", for the header.
    fn position(&self) -> String;
    /// false once a replay has reached its end or every live process exited.
    fn running(&self) -> bool;
}

/// What the replay keys ask of a feed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Control {
    /// Play or pause the recording (space).
    TogglePlay,
    /// Move by this many seconds, negative backwards (←/→).
    Seek(f64),
    /// Multiply the playback speed by this factor (+/-).
    Speed(f64),
}

#[derive(Clone, Debug)]
pub struct TuiOptions {
    /// Show the replay keys (space, ←/→, +/-) and pass them to [`Feed::control`].
    pub replay: bool,
    /// Where `e` writes report snapshots.
    pub report_dir: PathBuf,
    /// Styles without colours (the NO_COLOR convention).
    pub no_color: bool,
    /// `--warn-at PERCENT` for the header.
    pub warn_at: Option<f64>,
}

impl Default for TuiOptions {
    fn default() -> Self {
        Self {
            replay: false,
            report_dir: PathBuf::from("."),
            no_color: no_color_requested(),
            warn_at: None,
        }
    }
}

/// `NO_COLOR` set to anything non-empty (https://no-color.org).
pub fn no_color_requested() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

impl Feed for Session {
    fn pump(&mut self, timeout: Duration) -> Vec<Event> {
        Session::pump(self, timeout)
    }
    fn model(&self) -> &Model {
        &self.model
    }
    fn stacks(&self) -> &Stacks {
        &self.tracer.stacks
    }
    fn clock(&self) -> &WallClock {
        &self.clock
    }
    fn report(&self) -> Report {
        Session::report(self)
    }
    fn probe_cost(&self) -> Option<ProbeCost> {
        Some(Session::probe_cost(self))
    }
    fn listen_queues(&self, pid: crate::model::Pid) -> (Vec<crate::listeners::ListenQueue>, u64) {
        (
            self.listeners.queues.get(&pid).cloned().unwrap_or_default(),
            self.listeners.overflows(pid),
        )
    }
    fn position(&self) -> String {
        "live".into()
    }
    fn running(&self) -> bool {
        self.any_alive()
    }
}

/// How long one pump may wait: bounds the delay before a key is handled.
const PUMP: Duration = Duration::from_millis(50);
/// How often the view is refreshed and redrawn without a key press.
const FRAME: Duration = Duration::from_millis(250);

/// Runs the UI until `q`, Ctrl-C, SIGINT or SIGTERM. The terminal is restored however this
/// returns (a guard and a panic hook); while it runs, logs and stray standard error go to
/// [`log_path`].
pub fn run(feed: &mut dyn Feed, options: TuiOptions) -> anyhow::Result<()> {
    let log = log_path();
    logfile::install(&log, false);
    logfile::ECHO.store(false, std::sync::atomic::Ordering::Relaxed);
    log::info!("terminal UI started ({})", feed.position());
    let mut guard = terminal::TerminalGuard::enter(&log).context("setting up the terminal")?;
    let TuiOptions {
        replay,
        report_dir,
        no_color,
        warn_at,
    } = options;
    let mut app = App::new(replay, no_color);
    app.warn_at = warn_at;
    app.observe(feed);
    app.refresh(feed);
    let mut last_frame: Option<Instant> = None;
    loop {
        let mut dirty = false;
        while term::poll(Duration::ZERO).context("reading the terminal")? {
            match term::read().context("reading the terminal")? {
                TermEvent::Key(key) if key.kind != KeyEventKind::Release => {
                    if let Some(action) = app.handle_key(key) {
                        perform(&mut app, feed, action, &report_dir);
                        dirty = true;
                    }
                }
                TermEvent::Resize(..) => dirty = true,
                _ => {}
            }
        }
        if crate::signals::take().is_some() {
            app.update(Action::Quit);
        }
        if app.quit {
            break;
        }
        if dirty || last_frame.is_none_or(|t| t.elapsed() >= FRAME) {
            if last_frame.is_none_or(|t| t.elapsed() >= FRAME) {
                app.refresh(feed);
                last_frame = Some(Instant::now());
            }
            guard
                .terminal
                .draw(|frame| frame.render_widget(&app, frame.area()))
                .context("drawing the terminal")?;
        }
        feed.pump(PUMP);
        app.observe(feed);
    }
    drop(guard);
    log::info!("terminal UI closed");
    Ok(())
}

/// Carries out an action: I/O here, state changes in [`App::update`].
fn perform(app: &mut App, feed: &mut dyn Feed, action: Action, report_dir: &Path) {
    match action {
        Action::Export => {
            let status = match export(feed, report_dir) {
                Ok(path) => format!("report written to {}", path.display()),
                Err(err) => format!("{err:#}"),
            };
            log::info!("{status}");
            app.update(Action::Status(status));
        }
        Action::Replay(control) => {
            feed.control(control);
            app.observe(feed);
            app.refresh(feed);
        }
        action => app.update(action),
    }
}

/// Writes `fdtrace-report-<unix time>.json` in `dir`.
fn export(feed: &dyn Feed, dir: &Path) -> anyhow::Result<PathBuf> {
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = dir.join(format!("fdtrace-report-{unix}.json"));
    std::fs::write(&path, feed.report().to_json())
        .with_context(|| format!("writing the report to {}", path.display()))?;
    Ok(path)
}
