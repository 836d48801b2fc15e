//! Replaying a recording through the same model and views as a live session.
//!
//! The replay holds every step in memory and the model as of the replay position. Playing
//! advances the position in real time times the speed; seeking forward applies the steps in
//! between, seeking backward rebuilds the model from the start (the model is cheap to rebuild
//! and keeps no undo history).

use std::time::{Duration, Instant};

use super::{
    format::{Entry, Header},
    reader::{Damage, Recording},
};
use crate::{
    clock::WallClock,
    model::{Event, Model, Pid},
    report::Report,
    tracer::Stacks,
};

enum Action {
    Event(Event),
    ExitCode(Pid, i32),
}

struct Step {
    /// Replay position of the step: its event's time, or the last time before it for events
    /// without one. Never decreases.
    at: u64,
    action: Action,
}

pub struct Replay {
    pub header: Header,
    /// Set when the file stopped short of its proper end.
    pub damage: Option<Damage>,
    steps: Vec<Step>,
    stacks: Stacks,
    model: Model,
    applied: usize,
    start_ns: u64,
    end_ns: u64,
    position_ns: u64,
    playing: bool,
    speed: f64,
    last_pump: Option<Instant>,
}

impl Replay {
    /// A replay positioned at the start of `recording`, playing at normal speed.
    pub fn new(recording: Recording) -> Self {
        let mut stacks = Stacks::default();
        let mut steps = Vec::with_capacity(recording.entries.len());
        let mut at = None::<u64>;
        for entry in recording.entries {
            let action = match entry {
                // The reader checked the ids are consecutive from 1, as `push` assigns them.
                Entry::Stack { frames, .. } => {
                    stacks.push(frames);
                    continue;
                }
                Entry::Event(event) => {
                    if let Some(ts) = event.ts() {
                        at = Some(at.map_or(ts, |a| a.max(ts)));
                    }
                    Action::Event(event)
                }
                Entry::ExitCode { pid, code } => Action::ExitCode(pid, code),
                Entry::Finished { .. } => continue,
            };
            steps.push(Step {
                at: at.unwrap_or(recording.header.start_mono_ns),
                action,
            });
        }
        let start_ns = steps
            .first()
            .map_or(recording.header.start_mono_ns, |s| s.at);
        let end_ns = steps.last().map_or(start_ns, |s| s.at);
        Self {
            header: recording.header,
            damage: recording.damage,
            steps,
            stacks,
            model: Model::new(),
            applied: 0,
            start_ns,
            end_ns,
            position_ns: start_ns,
            playing: true,
            speed: 1.0,
            last_pump: None,
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn stacks(&self) -> &Stacks {
        &self.stacks
    }

    pub fn clock(&self) -> &WallClock {
        &self.header.clock
    }

    pub fn report(&self) -> Report {
        Report::build(&self.model, &self.stacks, &self.header.clock)
    }

    /// Events in the recording.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Applies every step up to and including time `ns`; returns the events applied.
    fn advance_to(&mut self, ns: u64) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(step) = self.steps.get(self.applied).filter(|s| s.at <= ns) {
            match &step.action {
                Action::Event(event) => {
                    self.model.apply(event);
                    out.push(event.clone());
                }
                Action::ExitCode(pid, code) => self.model.set_exit_code(*pid, *code),
            }
            self.applied += 1;
        }
        self.position_ns = ns.clamp(self.start_ns, self.end_ns);
        out
    }

    /// Moves the position to `ns` (clamped to the recording), rebuilding the model from the
    /// start when going back.
    pub fn seek_to(&mut self, ns: u64) {
        let ns = ns.clamp(self.start_ns, self.end_ns);
        if ns < self.position_ns {
            self.model = Model::new();
            self.applied = 0;
        }
        self.advance_to(ns);
    }

    /// Applies the whole recording (for reports and exports).
    pub fn to_end(&mut self) -> &Model {
        self.advance_to(u64::MAX);
        self.position_ns = self.end_ns;
        self.playing = false;
        &self.model
    }

    /// Waits `timeout`, then, when playing, advances by the time that passed times the speed.
    pub fn pump(&mut self, timeout: Duration) -> Vec<Event> {
        let Some(last) = self.last_pump else {
            // The first pump shows the start at once: the attach events and initial tables.
            self.last_pump = Some(Instant::now());
            return self.advance_to(self.position_ns);
        };
        std::thread::sleep(timeout);
        let now = Instant::now();
        let elapsed = now - last;
        self.last_pump = Some(now);
        if !self.playing {
            return Vec::new();
        }
        let step = (elapsed.as_nanos() as f64 * self.speed) as u64;
        let events = self.advance_to(self.position_ns.saturating_add(step));
        if self.applied == self.steps.len() {
            self.playing = false;
        }
        events
    }

    pub fn toggle_play(&mut self) {
        if !self.playing && self.applied == self.steps.len() {
            // Play again from the start.
            self.seek_to(self.start_ns);
        }
        self.playing = !self.playing;
        self.last_pump = Some(Instant::now());
    }

    /// Moves by `secs` seconds of recording time (negative: back).
    pub fn seek_by(&mut self, secs: f64) {
        let delta = (secs.abs() * 1e9) as u64;
        let target = if secs < 0.0 {
            self.position_ns.saturating_sub(delta)
        } else {
            self.position_ns.saturating_add(delta)
        };
        self.seek_to(target);
    }

    /// Sets the speed (1.0 is real time), between 1/64 and 1024.
    pub fn set_speed(&mut self, speed: f64) {
        if speed.is_finite() {
            self.speed = speed.clamp(1.0 / 64.0, 1024.0);
        }
    }

    pub fn speed(&self) -> f64 {
        self.speed
    }

    pub fn playing(&self) -> bool {
        self.playing
    }

    /// Whether steps remain to be replayed.
    pub fn running(&self) -> bool {
        self.applied < self.steps.len()
    }

    /// Seconds into the recording and its length.
    pub fn elapsed_secs(&self) -> (f64, f64) {
        (
            (self.position_ns - self.start_ns) as f64 / 1e9,
            (self.end_ns - self.start_ns) as f64 / 1e9,
        )
    }

    /// `replay 12.3s/60.0s x2` (`replay paused ...` when paused), for the header.
    pub fn position(&self) -> String {
        let (at, total) = self.elapsed_secs();
        format!(
            "replay {}{at:.1}s/{total:.1}s x{}",
            if self.playing { "" } else { "paused " },
            fmt_speed(self.speed)
        )
    }
}

impl crate::tui::Feed for Replay {
    fn pump(&mut self, timeout: Duration) -> Vec<Event> {
        Replay::pump(self, timeout)
    }

    fn model(&self) -> &Model {
        &self.model
    }

    fn stacks(&self) -> &Stacks {
        &self.stacks
    }

    fn clock(&self) -> &WallClock {
        &self.header.clock
    }

    fn report(&self) -> Report {
        Replay::report(self)
    }

    fn control(&mut self, control: crate::tui::Control) {
        match control {
            crate::tui::Control::TogglePlay => self.toggle_play(),
            crate::tui::Control::Seek(secs) => self.seek_by(secs),
            crate::tui::Control::Speed(factor) => self.set_speed(self.speed * factor),
        }
    }

    fn position(&self) -> String {
        Replay::position(self)
    }

    fn running(&self) -> bool {
        Replay::running(self)
    }
}

fn fmt_speed(speed: f64) -> String {
    if speed >= 1.0 {
        format!("{speed:.0}")
    } else {
        format!("1/{:.0}", 1.0 / speed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        clock::WallClock,
        model::{FdKind, NewFd, ProcessInfo},
        record::format::Command,
    };

    fn header() -> Header {
        Header {
            fdtrace_version: "0".into(),
            host: "h".into(),
            kernel: "k".into(),
            start_mono_ns: 1_000,
            clock: WallClock::default(),
            commands: vec![Command {
                pid: 7,
                argv: vec!["x".into()],
                limit: crate::model::Limit::default(),
            }],
            redacted: false,
            stack_bytes: 0,
        }
    }

    fn opened(ts: u64, fd: i32) -> Entry {
        Entry::Event(Event::Opened {
            pid: 7,
            tid: 7,
            ts,
            syscall: 2,
            fds: vec![NewFd {
                fd,
                kind: FdKind::File,
                target: Arc::from("/f"),
                cloexec: false,
            }],
            stack: 1,
        })
    }

    #[test]
    fn seeking_back_rebuilds_the_model() {
        let recording = Recording {
            header: header(),
            entries: vec![
                Entry::Stack {
                    id: 1,
                    frames: vec![],
                },
                Entry::Event(Event::Attached {
                    pid: 7,
                    ts: 1_000,
                    info: ProcessInfo::default(),
                    fds: vec![],
                }),
                opened(2_000_000_000, 3),
                opened(3_000_000_000, 4),
                Entry::Event(Event::Closed {
                    pid: 7,
                    ts: 4_000_000_000,
                    fd: 3,
                    reopened: false,
                }),
            ],
            damage: None,
        };
        let mut replay = Replay::new(recording);
        assert_eq!(replay.pump(Duration::ZERO).len(), 1);
        replay.seek_by(3.0);
        assert_eq!(replay.model().open_count(7), 2);
        replay.seek_by(-2.0);
        assert_eq!(replay.model().open_count(7), 0);
        replay.to_end();
        assert_eq!(replay.model().open_count(7), 1);
        assert!(!replay.running());
        replay.set_speed(1000.0);
        replay.toggle_play();
        assert!(replay.playing());
        assert_eq!(replay.model().open_count(7), 0, "replays from the start");
    }
}
