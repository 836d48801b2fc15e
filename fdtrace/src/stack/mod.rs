//! User stacks: from the registers and stack bytes a probe recorded to named call sites.
//!
//! The probes cannot walk user stacks themselves: Debian's libc and most -O2 code keep no
//! frame pointers (PLATFORM.md, "Stacks: frame pointers are not enough"). They copy the top
//! of the stack instead, and [`Unwinder`] replays it with each object's `.eh_frame` (framehop).
//! The result, [`RawFrame`]s, names objects and file offsets only, so it stays valid after the
//! process exits and can key call sites across processes; [`Symbolizer`] turns it into
//! functions and lines (blazesym) when someone wants to read it.

mod code_object;
pub(crate) mod maps;
mod memo;
mod symbolize;
mod unwind;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use memo::{StackMemo, raw_digest};
pub use symbolize::Symbolizer;
pub use unwind::{Mapping, Unwinder};

/// The module name of a file mapped by a process in another mount namespace (a container):
/// its path there, then its device and inode, which is what keeps two containers' different
/// files at one path apart in every cache keyed by module. [`display_path`] drops the suffix.
pub fn namespaced_module(path: &str, dev: u64, inode: u64) -> Arc<str> {
    Arc::from(format!("{path}{NS_MARK}{dev:x}:{inode}]"))
}

const NS_MARK: &str = " [file ";

/// A module name as the process sees its path (without [`namespaced_module`]'s identity).
pub fn display_path(module: &str) -> &str {
    module.split_once(NS_MARK).map_or(module, |(path, _)| path)
}

/// One frame of an unwound stack, process-independent: which object and where in it.
///
/// For every frame but the first, `addr` and `file_offset` point at the call instruction
/// (return address minus one), not at the return address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawFrame {
    /// Path of the mapped object as the process sees it (`[vdso]` for the vDSO; an unlinked
    /// file keeps its ` (deleted)` suffix). `None` for anonymous memory (JIT code) and for an
    /// instruction pointer outside every mapping.
    pub module: Option<Arc<str>>,
    /// Offset in the object's file, for symbolization without the process. Without a
    /// module: the offset in the anonymous mapping, or the address itself if unmapped.
    pub file_offset: u64,
    /// Absolute address in the process, for display.
    pub addr: u64,
}

/// A symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Frame {
    pub function: Option<String>,
    /// Source file name as DWARF gives it (often relative, like `src/main.rs`).
    pub file: Option<String>,
    /// The source file with its compilation directory, when DWARF gives one.
    pub path: Option<String>,
    pub line: Option<u32>,
    /// File name of the object, e.g. `libc.so.6`.
    pub module: Option<String>,
    /// Absolute address in the process (see [`RawFrame::addr`]).
    pub addr: u64,
    /// File offset in `module`.
    pub offset: u64,
    pub lang: Lang,
    /// This function was inlined into the frame that follows it.
    pub inlined: bool,
}

impl Frame {
    /// A frame known by its name alone, placed nowhere: one fdtrace makes up (see
    /// `tracer::SKIPPED_FRAME`).
    pub fn named(function: &str, lang: Lang) -> Self {
        Self {
            function: Some(function.to_string()),
            file: None,
            path: None,
            line: None,
            module: None,
            addr: 0,
            offset: 0,
            lang,
            inlined: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Native,
    Python,
}
