//! The recording file format, version 8. Version 7 lacked `Losses::stacks_skipped` (read as
//! 0, see `losses::reading_before_stacks_skipped`); version 6 lacked balanced descriptors
//! (`Event::Balanced`, the last variant). Version 5 lacked the state probe's upstream endings
//! and the tables at exit (`Event::UpstreamEnded` and `Event::ExitTable`, the last variants,
//! so version 5 reads as version 6); version 4 lacked failed outbound connections
//! (`Event::UpstreamFailed`, so version 4 reads as version 5); version 3
//! lacked what was missed by reason (`Event::Losses`, so it reads as version 4 does); version 2 lacked where
//! processes run (`ns_pid`, `container`) and is still read (see [`super::v2`]); version 1
//! lacked `reopened` on closes.
//!
//! ```text
//! prelude   MAGIC (8 bytes) · format version (u16 LE) · flags (u16 LE, 0)
//! chunk*    payload length (u32 LE) · crc32 of the payload (u32 LE) · payload
//! payload   zstd frame of postcard(Chunk)
//! ```
//! The first chunk holds the [`Header`]; every other chunk a run of [`Entry`]s, written at
//! least once a second. A chunk is only ever appended whole or not at all from the reader's
//! point of view: a file cut anywhere (crash, kill -9, full disk) reads up to its last whole
//! chunk, and the closing [`Entry::Finished`] tells a complete recording from a cut one.
//!
//! Inside a chunk, event timestamps are zigzag deltas from the previous event's (the first
//! from 0), so each chunk decodes on its own and a tight loop's timestamps cost a byte or two
//! before compression.

use serde::{Deserialize, Serialize};

use crate::{
    clock::WallClock,
    model::{Event, Limit, Pid, StackId},
    stack::Frame,
};

pub const MAGIC: [u8; 8] = *b"\x89fdtrace";
/// Bumped on any change an older reader would misread.
pub const FORMAT_VERSION: u16 = 8;
/// The oldest format this reader still reads.
pub const OLDEST_READABLE: u16 = 2;
pub const PRELUDE_LEN: usize = MAGIC.len() + 4;
pub const CHUNK_HEADER_LEN: usize = 8;
/// Larger chunks are refused as damage (the writer stays far below).
pub const MAX_CHUNK: usize = 64 << 20;
/// Decompressed size beyond which a chunk is refused as damage.
pub const MAX_DECOMPRESSED: u64 = 512 << 20;
/// zstd level: recordings are written once a second, so a mid level costs nothing noticeable.
pub const ZSTD_LEVEL: i32 = 9;

/// Who recorded what, where and when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub fdtrace_version: String,
    pub host: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// CLOCK_MONOTONIC when recording began.
    pub start_mono_ns: u64,
    /// Monotonic to wall-clock offset measured at start.
    pub clock: WallClock,
    /// The processes tracing started with (their descendants appear as Forked events).
    pub commands: Vec<Command>,
    /// Paths, peer addresses and arguments were replaced by tokens (`record --redact`).
    pub redacted: bool,
    /// User stack bytes copied per creation (0: no stacks).
    pub stack_bytes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub pid: Pid,
    pub argv: Vec<String>,
    pub limit: Limit,
}

/// One record in a chunk: exactly what the model consumed, plus the stacks it refers to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// A newly interned stack, written before the first event that refers to it. Ids are
    /// consecutive from 1, as the tracer assigned them.
    Stack {
        id: StackId,
        frames: Vec<Frame>,
    },
    Event(Event),
    /// A process's exit status learned from waitpid (`Model::set_exit_code`).
    ExitCode {
        pid: Pid,
        code: i32,
    },
    /// The recording was closed properly; `events` were written in all.
    Finished {
        events: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Chunk {
    Header(Header),
    Entries(Vec<Entry>),
}

/// Replaces absolute timestamps by zigzag deltas, in order (the writer's half).
#[derive(Default)]
pub struct DeltaEncoder {
    prev: u64,
}

impl DeltaEncoder {
    pub fn encode(&mut self, event: &mut Event) {
        if let Some(ts) = event.ts_mut() {
            let delta = ts.wrapping_sub(self.prev) as i64;
            self.prev = *ts;
            *ts = ((delta << 1) ^ (delta >> 63)) as u64;
        }
    }

    pub fn decode(&mut self, event: &mut Event) {
        if let Some(ts) = event.ts_mut() {
            let delta = ((*ts >> 1) as i64) ^ -((*ts & 1) as i64);
            self.prev = self.prev.wrapping_add(delta as u64);
            *ts = self.prev;
        }
    }
}

/// Serializes and compresses a chunk (already delta-encoded) into its frame; any serializable
/// chunk, so that tests can write [`super::v2`] files too.
pub fn encode_chunk(chunk: &impl Serialize) -> std::io::Result<Vec<u8>> {
    let raw = postcard::to_stdvec(chunk).map_err(std::io::Error::other)?;
    let payload = zstd::bulk::compress(&raw, ZSTD_LEVEL)?;
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

pub fn prelude() -> [u8; PRELUDE_LEN] {
    let mut p = [0u8; PRELUDE_LEN];
    p[..MAGIC.len()].copy_from_slice(&MAGIC);
    p[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_round_trip_backwards_too() {
        let times = [5_000_000_000u64, 5_000_000_100, 4_999_999_000, 7, u64::MAX];
        let mut enc = DeltaEncoder::default();
        let mut dec = DeltaEncoder::default();
        for t in times {
            let mut e = Event::Tick { ts: t };
            enc.encode(&mut e);
            dec.decode(&mut e);
            assert_eq!(e, Event::Tick { ts: t });
        }
    }
}
