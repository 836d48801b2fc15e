//! The flight recorder (`serve --flight-recorder DIR`): the last seconds of what a recording
//! holds, kept in memory, and written to a recording when a process hits EMFILE/ENFILE or
//! crosses `--warn-at`, with the seconds that follow.
//!
//! A recording replays from an empty model, so the seconds kept must start from a complete
//! state. The recorder keeps them as two segments, each opening with a keyframe: the traced
//! processes' tables at the segment's start, spelled as the events that rebuild them
//! (`Attached` with what was open before tracing, then one `Opened` per call site with its
//! stack). A new segment starts every `--flight-seconds`, so the previous one's keyframe is
//! between one and two windows old, and a recording written now holds at least the window.
//! What a keyframe cannot say: when each descriptor was created (they are stamped with the
//! keyframe's time), and which processes shared one table (each gets its own copy).
//!
//! Events are kept encoded (postcard, as in the recording's chunks) in one buffer per segment,
//! written by the session's observer straight from the event it is shown: about 20 bytes an
//! event and no allocation per event. Kept as `Event`s, a million a second from a tight loop
//! spent the tracer's time in malloc and lost half of them.

use std::{
    cell::RefCell,
    fs, io,
    path::{Path, PathBuf},
    rc::Rc,
    time::{Duration, Instant},
};

use fdtrace_common::syscalls;

use super::{Command, Header, Recorder, writer::RecordStats};
use crate::{
    clock::{WallClock, monotonic_ns},
    model::{Event, Model, NewFd, Origin, Pid},
    tracer::Stacks,
};

/// A segment ends at this many bytes of encoded events even before its time is up, so that a
/// burst (a million events a second from a tight loop) costs tens of MB, not gigabytes: the
/// recording then reaches back less far, and the log says so.
const SEGMENT_BYTES_MAX: usize = 16 << 20;
/// The recording goes on this long after what triggered it (DESIGN.md: "plus 10 s after").
pub const AFTER: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct FlightOptions {
    pub dir: PathBuf,
    /// How far back a recording reaches.
    pub window: Duration,
    /// Recordings kept in `dir`; the oldest `fdtrace-*.fdtrace` go first.
    pub max_files: usize,
    pub stack_bytes: u32,
}

/// A recording written in full (its `AFTER` seconds are over, or fdtrace is stopping).
#[derive(Clone, Debug)]
pub struct Written {
    pub path: PathBuf,
    pub pid: Pid,
    pub stats: RecordStats,
    /// Seconds of history before the trigger.
    pub before_secs: f64,
    /// Stopped before its `AFTER` seconds were over.
    pub cut_short: bool,
}

#[derive(Default)]
struct Segment {
    start_ns: u64,
    /// Encoded events (see [`encode`]).
    keyframe: Vec<u8>,
    events: Vec<u8>,
}

/// A recording being written: what came before is in it, the rest follows as it comes.
struct Capture {
    recorder: Recorder,
    path: PathBuf,
    pid: Pid,
    trigger_ns: u64,
    start_ns: u64,
    until: Instant,
}

pub struct FlightRecorder {
    options: FlightOptions,
    /// Encoded events the observer was shown since the last sync.
    queued: Rc<RefCell<Vec<u8>>>,
    previous: Option<Segment>,
    current: Segment,
    captures: Vec<Capture>,
}

impl FlightRecorder {
    /// A recorder writing to `options.dir`, which is created. It keeps what [`Self::observer`]
    /// is given.
    pub fn new(options: FlightOptions) -> io::Result<Self> {
        fs::create_dir_all(&options.dir)?;
        Ok(Self {
            options,
            queued: Rc::default(),
            previous: None,
            current: Segment {
                start_ns: monotonic_ns(),
                ..Segment::default()
            },
            captures: Vec::new(),
        })
    }

    /// The session's observer (install it before the first `add`): every event the model
    /// consumes, queued for [`Self::sync`].
    pub fn observer(&self) -> impl FnMut(&Event) + 'static {
        let sink = self.queued.clone();
        move |event: &Event| encode(event, &mut sink.borrow_mut())
    }

    /// Takes what the model consumed since the last call: into the segments, and into the
    /// recordings being written. Returns the recordings completed now. Call after each pump.
    pub fn sync(&mut self, model: &Model, stacks: &Stacks) -> Vec<Written> {
        let events = std::mem::take(&mut *self.queued.borrow_mut());
        for capture in &mut self.captures {
            capture.recorder.stacks(stacks);
            for event in decode(&events) {
                capture.recorder.event(&event);
            }
        }
        self.current.events.extend_from_slice(&events);
        let now = monotonic_ns();
        let full = self.current.events.len() >= SEGMENT_BYTES_MAX;
        if full
            || now.saturating_sub(self.current.start_ns) >= self.options.window.as_nanos() as u64
        {
            if full {
                log::info!(
                    "flight recorder: {} MiB of events in {:.1} s; a recording now reaches back less than {} s",
                    SEGMENT_BYTES_MAX >> 20,
                    now.saturating_sub(self.current.start_ns) as f64 / 1e9,
                    self.options.window.as_secs()
                );
            }
            self.next_segment(model, now);
        }
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.captures.len() {
            if Instant::now() >= self.captures[i].until {
                let capture = self.captures.swap_remove(i);
                done.extend(finish(capture, false));
            } else {
                if let Err(err) = self.captures[i].recorder.flush_if_due() {
                    log::warn!(
                        "flight recorder: writing {}: {err}",
                        self.captures[i].path.display()
                    );
                }
                i += 1;
            }
        }
        done
    }

    /// Starts a segment at `now` with the model's tables as its keyframe.
    fn next_segment(&mut self, model: &Model, now: u64) {
        let next = Segment {
            start_ns: now,
            keyframe: keyframe(model, now),
            // Reserved whole: growing by doubling would copy it and, for a moment, hold twice
            // its size. Pages that are never written cost nothing.
            events: Vec::with_capacity(SEGMENT_BYTES_MAX + (64 << 10)),
        };
        self.previous = Some(std::mem::replace(&mut self.current, next));
    }

    /// Whether a recording of `pid` is being written.
    pub fn capturing(&self, pid: Pid) -> bool {
        self.captures.iter().any(|c| c.pid == pid)
    }

    /// Starts a recording of what is kept, for `pid` (named `comm`), which goes on for
    /// [`AFTER`]. `ts` is when what triggered it happened. Makes room first: at most
    /// `max_files` recordings stay in the directory.
    pub fn trigger(
        &mut self,
        stacks: &Stacks,
        clock: WallClock,
        pid: Pid,
        comm: &str,
        ts: u64,
    ) -> io::Result<PathBuf> {
        self.make_room()?;
        let unix = clock.wall_ns(ts) / 1_000_000_000;
        let path = self
            .options
            .dir
            .join(format!("fdtrace-{}-{pid}-{unix}.fdtrace", file_safe(comm)));
        let (segments, start_ns): (Vec<&Segment>, u64) = match &self.previous {
            Some(previous) => (vec![previous, &self.current], previous.start_ns),
            None => (vec![&self.current], self.current.start_ns),
        };
        let mut header = Header::here(
            clock,
            vec![Command::of_process(pid)],
            self.options.stack_bytes,
        );
        header.start_mono_ns = start_ns;
        let mut recorder = Recorder::create(&path, header, false)?;
        recorder.stacks(stacks);
        // The first segment's keyframe, then every event since: a later segment's keyframe
        // only restates what the events before it built.
        for event in decode(&segments[0].keyframe) {
            recorder.event(&event);
        }
        for segment in &segments {
            for event in decode(&segment.events) {
                recorder.event(&event);
            }
        }
        recorder.flush()?;
        self.captures.push(Capture {
            recorder,
            path: path.clone(),
            pid,
            trigger_ns: ts,
            start_ns,
            until: Instant::now() + AFTER,
        });
        Ok(path)
    }

    /// Completes the recordings being written (fdtrace is stopping).
    pub fn finish_all(&mut self, model: &Model, stacks: &Stacks) -> Vec<Written> {
        self.sync(model, stacks);
        self.captures
            .drain(..)
            .filter_map(|c| finish(c, true))
            .collect()
    }

    /// Removes the oldest recordings until one more fits under `max_files`.
    fn make_room(&self) -> io::Result<()> {
        let mut kept: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&self.options.dir)?
            .filter_map(Result::ok)
            .filter(|e| is_flight_file(&e.path()))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        kept.sort();
        let excess = (kept.len() + 1).saturating_sub(self.options.max_files.max(1));
        for (_, path) in kept.into_iter().take(excess) {
            log::info!(
                "flight recorder: removing {} (--flight-max-files)",
                path.display()
            );
            fs::remove_file(&path)?;
        }
        Ok(())
    }
}

fn finish(capture: Capture, cut_short: bool) -> Option<Written> {
    let Capture {
        recorder,
        path,
        pid,
        trigger_ns,
        start_ns,
        ..
    } = capture;
    match recorder.finish() {
        Ok(stats) => Some(Written {
            path,
            pid,
            stats,
            before_secs: trigger_ns.saturating_sub(start_ns) as f64 / 1e9,
            cut_short,
        }),
        Err(err) => {
            log::warn!("flight recorder: finishing {}: {err}", path.display());
            None
        }
    }
}

fn is_flight_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("fdtrace-") && n.ends_with(".fdtrace"))
}

/// A comm as a file name part: the kernel allows '/' and control characters in one.
fn file_safe(comm: &str) -> String {
    comm.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Appends `event` to `buf`, self-delimited.
fn encode(event: &Event, buf: &mut Vec<u8>) {
    let taken = std::mem::take(buf);
    match postcard::to_extend(event, taken) {
        Ok(extended) => *buf = extended,
        // Postcard fails only on types it cannot express, which `Event` has none of; a
        // failure would lose this event from recordings, not the buffer.
        Err(err) => log::warn!("flight recorder: encoding an event: {err}"),
    }
}

/// The events `encode` appended to `buf`, in order.
fn decode(mut buf: &[u8]) -> impl Iterator<Item = Event> + '_ {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        match postcard::take_from_bytes::<Event>(buf) {
            Ok((event, rest)) => {
                buf = rest;
                Some(event)
            }
            Err(err) => {
                log::warn!("flight recorder: decoding an event: {err}");
                None
            }
        }
    })
}

/// The events that rebuild the live processes' tables as the model holds them now, encoded.
fn keyframe(model: &Model, ts: u64) -> Vec<u8> {
    let mut events = Vec::new();
    for p in model.processes.values().filter(|p| p.alive()) {
        let Some(fds) = model.open_fds(p.pid) else {
            continue;
        };
        let mut before = Vec::new();
        // By site: one event per stack, as the probes' records come.
        let mut by_site: std::collections::BTreeMap<usize, Vec<NewFd>> =
            std::collections::BTreeMap::new();
        for (fd, open) in fds.iter() {
            let new = NewFd {
                fd,
                kind: open.kind,
                target: open.target.as_str().into(),
                cloexec: open.cloexec,
            };
            if model.sites[open.site()].origin == Origin::Traced {
                by_site.entry(open.site()).or_default().push(new);
            } else {
                before.push(new);
            }
        }
        let attached = Event::Attached {
            pid: p.pid,
            ts,
            info: p.info.clone(),
            fds: before,
        };
        encode(&attached, &mut events);
        for (site, fds) in by_site {
            let opened = Event::Opened {
                pid: p.pid,
                tid: p.pid,
                ts,
                // Not known any more, and not used by the model or the reports.
                syscall: syscalls::OPENAT,
                fds,
                stack: model.sites[site].stack,
            };
            encode(&opened, &mut events);
        }
    }
    events
}

#[cfg(test)]
impl FlightRecorder {
    /// Starts the next segment now, as time would.
    pub(super) fn rotate_now(&mut self, model: &Model) {
        self.next_segment(model, monotonic_ns());
    }
}
