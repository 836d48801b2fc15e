//! Writing recordings: [`Recorder`] frames entries into chunks; [`SessionRecorder`] feeds it
//! from a live [`Session`].

use std::{
    cell::RefCell,
    fs::File,
    io::{self, Write as _},
    path::Path,
    rc::Rc,
    time::{Duration, Instant},
};

use super::{
    format::{self, Chunk, DeltaEncoder, Entry, Header},
    redact::Redactor,
};
use crate::{
    model::{Event, Pid},
    session::Session,
    tracer::Stacks,
};

/// A chunk is written at least this often, so a crash loses at most this much.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// ... or when this many entries wait, to bound memory and chunk size.
const FLUSH_ENTRIES: usize = 65_536;

/// What a recording holds, for the closing message and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordStats {
    pub events: u64,
    pub stacks: u64,
    pub chunks: u64,
    /// File size in bytes.
    pub bytes: u64,
}

impl RecordStats {
    pub fn bytes_per_event(&self) -> f64 {
        self.bytes as f64 / self.events.max(1) as f64
    }
}

pub struct Recorder {
    file: File,
    pending: Vec<Entry>,
    delta: DeltaEncoder,
    last_flush: Instant,
    stacks_written: usize,
    redactor: Option<Redactor>,
    stats: RecordStats,
}

impl Recorder {
    /// Creates `path` and writes the prelude and `header`; with `redact`, the header's host and
    /// command lines, and everything written after it, are redacted.
    pub fn create(path: &Path, mut header: Header, redact: bool) -> io::Result<Self> {
        let file = File::create(path)?;
        let redactor = redact.then(Redactor::new);
        if let Some(r) = &redactor {
            header.host = r.token("host", &header.host);
            for c in &mut header.commands {
                c.argv = r.argv(&c.argv);
            }
        }
        header.redacted = redact;
        let mut recorder = Self {
            file,
            pending: Vec::new(),
            delta: DeltaEncoder::default(),
            last_flush: Instant::now(),
            stacks_written: 0,
            redactor,
            stats: RecordStats::default(),
        };
        recorder.write(&format::prelude())?;
        recorder.write_chunk(&Chunk::Header(header))?;
        Ok(recorder)
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.stats.bytes += bytes.len() as u64;
        Ok(())
    }

    fn write_chunk(&mut self, chunk: &Chunk) -> io::Result<()> {
        let framed = format::encode_chunk(chunk)?;
        self.write(&framed)?;
        self.stats.chunks += 1;
        Ok(())
    }

    /// Queues the stacks interned since the last call (ids are consecutive from 1).
    pub fn stacks(&mut self, stacks: &Stacks) {
        while self.stacks_written < stacks.len() {
            self.stacks_written += 1;
            let id = self.stacks_written as u32;
            let frames = match &self.redactor {
                Some(r) => r.frames(stacks.get(id)),
                None => stacks.get(id).to_vec(),
            };
            self.pending.push(Entry::Stack { id, frames });
            self.stats.stacks += 1;
        }
    }

    /// Queues an event the model consumed; its stacks must have been queued first.
    pub fn event(&mut self, event: &Event) {
        let mut event = match &self.redactor {
            Some(r) => r.event(event),
            None => event.clone(),
        };
        self.delta.encode(&mut event);
        self.pending.push(Entry::Event(event));
        self.stats.events += 1;
    }

    pub fn exit_code(&mut self, pid: Pid, code: i32) {
        self.pending.push(Entry::ExitCode { pid, code });
    }

    /// Writes the queued entries as a chunk if a second has passed since the last one.
    pub fn flush_if_due(&mut self) -> io::Result<()> {
        if self.last_flush.elapsed() >= FLUSH_EVERY || self.pending.len() >= FLUSH_ENTRIES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the queued entries as a chunk now.
    pub fn flush(&mut self) -> io::Result<()> {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return Ok(());
        }
        let entries = std::mem::take(&mut self.pending);
        // Each chunk decodes on its own: deltas restart from zero.
        self.delta = DeltaEncoder::default();
        self.write_chunk(&Chunk::Entries(entries))
    }

    /// Writes what is queued and the closing entry, and syncs the file to disk.
    pub fn finish(mut self) -> io::Result<RecordStats> {
        let events = self.stats.events;
        self.pending.push(Entry::Finished { events });
        self.flush()?;
        self.file.sync_all()?;
        Ok(self.stats)
    }

    pub fn stats(&self) -> RecordStats {
        self.stats
    }
}

/// Records everything a live session's model consumes.
///
/// The session's observer queues each event; [`SessionRecorder::sync`], called after each
/// `pump` (and after `add`), writes the stacks the tracer interned since the last sync and then
/// the queued events. Every stack an event refers to was interned before the event reached the
/// model, so stacks always precede their first use in the file.
pub struct SessionRecorder {
    recorder: Recorder,
    queued: Rc<RefCell<Vec<Event>>>,
}

impl SessionRecorder {
    /// Hooks `recorder` into `session`'s observer; install it before the first `add`.
    pub fn install(session: &mut Session, recorder: Recorder) -> Self {
        let queued: Rc<RefCell<Vec<Event>>> = Rc::default();
        let sink = queued.clone();
        session.set_observer(Box::new(move |event: &Event| {
            sink.borrow_mut().push(event.clone());
        }));
        Self { recorder, queued }
    }

    /// Moves what the session consumed since the last call into the recording, and writes a
    /// chunk if one is due.
    pub fn sync(&mut self, session: &Session) -> io::Result<()> {
        self.drain(session);
        self.recorder.flush_if_due()
    }

    fn drain(&mut self, session: &Session) {
        self.recorder.stacks(&session.tracer.stacks);
        for event in self.queued.borrow_mut().drain(..) {
            self.recorder.event(&event);
        }
    }

    /// Records what `Session::set_exit_code` told the model, after the events before it (the
    /// model ignores an exit code for a process whose exit it has not seen).
    pub fn exit_code(&mut self, session: &Session, pid: Pid, code: i32) {
        self.drain(session);
        self.recorder.exit_code(pid, code);
    }

    pub fn stats(&self) -> RecordStats {
        self.recorder.stats()
    }

    pub fn finish(mut self, session: &Session) -> io::Result<RecordStats> {
        self.drain(session);
        self.recorder.finish()
    }
}
