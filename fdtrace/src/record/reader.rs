//! Reading recordings: whatever the bytes, a [`Recording`] of what was whole, or one
//! [`ReadError`] that says why there is none. Never panics (the fuzz target holds it to that).

use std::{io::Read as _, path::Path};

use super::{
    format::{
        self, CHUNK_HEADER_LEN, Chunk, DeltaEncoder, Entry, FORMAT_VERSION, Header, MAGIC,
        MAX_CHUNK, MAX_DECOMPRESSED, OLDEST_READABLE, PRELUDE_LEN,
    },
    v2,
};

/// Why a file gives nothing to read. Displayed after the file's name: "FILE {error}".
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("is not an fdtrace recording")]
    NotRecording,
    #[error(
        "was written by an older fdtrace (format {0}; this one reads formats {OLDEST_READABLE} to {FORMAT_VERSION}): report it with that version"
    )]
    Older(u16),
    #[error("was written by a newer fdtrace (format {0}; this one reads format {FORMAT_VERSION})")]
    Newer(u16),
    #[error("was cut or damaged before its header ended: there is nothing to read")]
    NoHeader,
    #[error("could not be read: {0}")]
    Io(#[from] std::io::Error),
}

/// A [`ReadError`] with the file it is about, displayed as one line (the cause is part of it,
/// so it is not also a `source` that error chains would print twice).
#[derive(Debug, thiserror::Error)]
#[error("{path} {error}")]
pub struct FileError {
    pub path: String,
    pub error: ReadError,
}

/// Where and how a recording stops short of its proper end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside a chunk (a crash, kill -9 or a full disk while writing).
    Cut { offset: u64 },
    /// A chunk's checksum or contents are wrong; nothing after it is read.
    Corrupt { offset: u64 },
    /// Every chunk is whole but the closing one is missing (the recorder was killed between
    /// two chunks).
    Unfinished,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Cut { offset } => write!(
                f,
                "was cut short (the recorder did not finish: the chunk at byte {offset} is incomplete); read what was whole before it"
            ),
            Damage::Corrupt { offset } => write!(
                f,
                "is damaged at byte {offset}; read what was whole before it"
            ),
            Damage::Unfinished => write!(
                f,
                "ends without its closing chunk (the recorder did not finish); read all of it"
            ),
        }
    }
}

/// A recording as read: the header and the entries in file order, event timestamps absolute.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    pub header: Header,
    /// Stacks, events and exit codes (the closing entry is taken out).
    pub entries: Vec<Entry>,
    /// Set when the file stops short of its closing chunk; what was whole is in `entries`.
    pub damage: Option<Damage>,
}

/// Reads the recording at `path`.
pub fn open(path: &Path) -> Result<Recording, FileError> {
    let with_path = |error| FileError {
        path: path.display().to_string(),
        error,
    };
    let bytes = std::fs::read(path).map_err(|e| with_path(ReadError::Io(e)))?;
    parse(&bytes).map_err(with_path)
}

enum ChunkError {
    /// The file ends inside the chunk.
    Cut,
    Corrupt,
}

/// The decompressed, decoded chunk at the start of `bytes` (of a file in format `version`)
/// and its framed length.
fn chunk(bytes: &[u8], verify: bool, version: u16) -> Result<(Chunk, usize), ChunkError> {
    let Some(head) = bytes.get(..CHUNK_HEADER_LEN) else {
        return Err(ChunkError::Cut);
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_CHUNK {
        return Err(ChunkError::Corrupt);
    }
    let Some(payload) = bytes.get(CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + len) else {
        return Err(ChunkError::Cut);
    };
    if verify && crc32fast::hash(payload) != crc {
        return Err(ChunkError::Corrupt);
    }
    let mut raw = Vec::new();
    let decoder =
        zstd::stream::read::Decoder::with_buffer(payload).map_err(|_| ChunkError::Corrupt)?;
    decoder
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut raw)
        .map_err(|_| ChunkError::Corrupt)?;
    if raw.len() as u64 > MAX_DECOMPRESSED {
        return Err(ChunkError::Corrupt);
    }
    let chunk = if version == 2 {
        postcard::from_bytes::<v2::Chunk>(&raw).map(v2::Chunk::upgrade)
    } else if version < 8 {
        crate::losses::reading_before_stacks_skipped(|| postcard::from_bytes(&raw))
    } else {
        postcard::from_bytes(&raw)
    };
    Ok((
        chunk.map_err(|_| ChunkError::Corrupt)?,
        CHUNK_HEADER_LEN + len,
    ))
}

/// Reads a recording from its bytes.
pub fn parse(bytes: &[u8]) -> Result<Recording, ReadError> {
    parse_with(bytes, true)
}

/// [`parse`], optionally without checking the chunks' checksums: the fuzz target uses that to
/// reach the decoders behind them with mutated input.
pub fn parse_with(bytes: &[u8], verify_checksums: bool) -> Result<Recording, ReadError> {
    let verify = verify_checksums;
    let Some(prelude) = bytes.get(..PRELUDE_LEN) else {
        let is_start = !bytes.is_empty() && MAGIC.starts_with(&bytes[..bytes.len().min(8)]);
        return Err(if is_start {
            ReadError::NoHeader
        } else {
            ReadError::NotRecording
        });
    };
    if prelude[..MAGIC.len()] != MAGIC {
        return Err(ReadError::NotRecording);
    }
    let version = u16::from_le_bytes([prelude[8], prelude[9]]);
    if version > FORMAT_VERSION {
        return Err(ReadError::Newer(version));
    }
    if version == 0 {
        return Err(ReadError::NotRecording);
    }
    if version < OLDEST_READABLE {
        return Err(ReadError::Older(version));
    }
    let mut at = PRELUDE_LEN;
    let header = match chunk(&bytes[at..], verify, version) {
        Ok((Chunk::Header(header), len)) => {
            at += len;
            header
        }
        Ok((Chunk::Entries(_), _)) | Err(_) => return Err(ReadError::NoHeader),
    };

    let mut entries = Vec::new();
    let mut stacks = 0u32;
    let mut finished = false;
    let mut damage = None;
    while at < bytes.len() {
        let offset = at as u64;
        let list = match chunk(&bytes[at..], verify, version) {
            Ok((Chunk::Entries(list), len)) => {
                at += len;
                list
            }
            Ok((Chunk::Header(_), _)) | Err(ChunkError::Corrupt) => {
                damage = Some(Damage::Corrupt { offset });
                break;
            }
            Err(ChunkError::Cut) => {
                damage = Some(Damage::Cut { offset });
                break;
            }
        };
        let mut delta = DeltaEncoder::default();
        let mut valid = Vec::with_capacity(list.len());
        for mut entry in list {
            match &mut entry {
                Entry::Event(event) => delta.decode(event),
                Entry::Stack { id, .. } => {
                    // Ids are consecutive: replay interns the stacks in file order.
                    if *id != stacks + 1 {
                        damage = Some(Damage::Corrupt { offset });
                        break;
                    }
                    stacks += 1;
                }
                Entry::ExitCode { .. } => {}
                Entry::Finished { .. } => {
                    finished = true;
                    continue;
                }
            }
            valid.push(entry);
        }
        if damage.is_some() {
            // The chunk is unusable as a whole: its events may refer to the bad stack.
            break;
        }
        entries.extend(valid);
    }
    if damage.is_none() && !finished {
        damage = Some(Damage::Unfinished);
    }
    Ok(Recording {
        header,
        entries,
        damage,
    })
}

/// The events of a recording, in order (stacks and exit codes left out).
pub fn events(recording: &Recording) -> impl Iterator<Item = &crate::model::Event> {
    recording.entries.iter().filter_map(|e| match e {
        Entry::Event(event) => Some(event),
        _ => None,
    })
}

/// The prelude for a recording of format `version`; for tests of version checks.
pub fn prelude_of_version(version: u16) -> [u8; PRELUDE_LEN] {
    let mut p = format::prelude();
    p[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&version.to_le_bytes());
    p
}
