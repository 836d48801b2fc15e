//! Names for unwound frames, from the object files alone (the process may be gone).

use foldhash::HashMap;
use std::iter;
use std::sync::Arc;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{CodeInfo, Input, Sym, Symbolized};

use super::{Frame, Lang, RawFrame};

/// Symbolizes [`RawFrame`]s with blazesym, remembering every answer.
pub struct Symbolizer {
    inner: blazesym::symbolize::Symbolizer,
    /// Module path -> file offset -> frames, innermost inlined function first, with `addr` 0
    /// (the address differs between processes; the answer does not).
    cache: HashMap<Arc<str>, HashMap<u64, Box<[Frame]>>>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        let inner = blazesym::symbolize::Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            // Separate debug info is looked up by default under /usr/lib/debug and /lib/debug,
            // by build ID and by .gnu_debuglink.
            .build();
        Self {
            inner,
            cache: HashMap::default(),
        }
    }

    /// Symbolizes from the object files: DWARF line info when present (also separate debug
    /// info under /usr/lib/debug, found by build ID or debuglink), else ELF symbols, else just
    /// module and offset. A frame inside inlined code expands into one `Frame` per inlined
    /// function (`inlined: true`), innermost first, followed by the function they were
    /// inlined into. Each (module, offset) is resolved once.
    pub fn symbolize(&mut self, frames: &[RawFrame]) -> Vec<Frame> {
        self.symbolize_with(frames, &|_| None)
    }

    /// [`Self::symbolize`], reading the modules for which `open_path` gives a path (a
    /// container's files, see [`super::namespaced_module`]) from there.
    pub fn symbolize_with(
        &mut self,
        frames: &[RawFrame],
        open_path: &dyn Fn(&str) -> Option<String>,
    ) -> Vec<Frame> {
        self.resolve_missing(frames, open_path);
        let mut symbolized = Vec::with_capacity(frames.len());
        for raw in frames {
            let known = raw
                .module
                .as_deref()
                .and_then(|module| self.cache.get(module))
                .and_then(|offsets| offsets.get(&raw.file_offset));
            match known {
                Some(known) => symbolized.extend(known.iter().map(|frame| Frame {
                    addr: raw.addr,
                    ..frame.clone()
                })),
                None => symbolized.push(Frame {
                    addr: raw.addr,
                    ..unnamed(None, raw.file_offset)
                }),
            }
        }
        symbolized
    }

    /// Asks blazesym about every (module, offset) not cached yet, one batch per module.
    fn resolve_missing(&mut self, frames: &[RawFrame], open_path: &dyn Fn(&str) -> Option<String>) {
        let mut missing: Vec<(&Arc<str>, Vec<u64>)> = Vec::new();
        for raw in frames {
            let Some(module) = &raw.module else { continue };
            if self
                .cache
                .get(&**module)
                .is_some_and(|offsets| offsets.contains_key(&raw.file_offset))
            {
                continue;
            }
            match missing.iter_mut().find(|(m, _)| m == &module) {
                Some((_, offsets)) if offsets.contains(&raw.file_offset) => {}
                Some((_, offsets)) => offsets.push(raw.file_offset),
                None => missing.push((module, vec![raw.file_offset])),
            }
        }
        for (module, offsets) in missing {
            let resolved = self.resolve(module, &offsets, open_path);
            let cached = self.cache.entry(Arc::clone(module)).or_default();
            cached.extend(offsets.into_iter().zip(resolved));
        }
    }

    fn resolve(
        &self,
        module: &str,
        offsets: &[u64],
        open_path: &dyn Fn(&str) -> Option<String>,
    ) -> Vec<Box<[Frame]>> {
        let name = object_name(module);
        let unknown = |offset| -> Box<[Frame]> { Box::new([unnamed(Some(name), offset)]) };
        // Only real paths can be opened: not "[vdso]", nor an unlinked file whose path may
        // name a different file by now (the unwinder marks those " (deleted)"), nor a
        // container's file by its path there, which here names another file or none.
        let path = match open_path(module) {
            Some(path) => path,
            None if module.starts_with('/')
                && !module.ends_with(" (deleted)")
                && super::display_path(module) == module =>
            {
                module.to_owned()
            }
            None => return offsets.iter().copied().map(unknown).collect(),
        };
        let source = Source::Elf(Elf::new(path));
        match self.inner.symbolize(&source, Input::FileOffset(offsets)) {
            Ok(symbols) => symbols
                .into_iter()
                .zip(offsets)
                .map(|(symbol, &offset)| match symbol {
                    Symbolized::Sym(sym) => expand(&sym, name, offset),
                    Symbolized::Unknown(_) => unknown(offset),
                })
                .collect(),
            Err(e) => {
                log::debug!("symbolizing {module}: {e:#}");
                offsets.iter().copied().map(unknown).collect()
            }
        }
    }
}

/// The file name of an object, as `Frame::module` shows it.
fn object_name(module: &str) -> &str {
    let path = super::display_path(module);
    path.rsplit('/').next().unwrap_or(path)
}

fn unnamed(module: Option<&str>, offset: u64) -> Frame {
    Frame {
        function: None,
        file: None,
        path: None,
        line: None,
        module: module.map(str::to_owned),
        addr: 0,
        offset,
        lang: Lang::Native,
        inlined: false,
    }
}

/// One frame per inlined function, innermost first, then the function they are inlined into.
/// blazesym lists inlined functions outermost first, each with the location inside it (the
/// call site of the next one, or the address itself for the last); `sym.code_info` is the
/// location in the outer function.
fn expand(sym: &Sym<'_>, module: &str, offset: u64) -> Box<[Frame]> {
    let frame = |function: &str, code_info: Option<&CodeInfo<'_>>, inlined: bool| Frame {
        function: Some(function.to_owned()),
        file: code_info.map(|info| info.file.to_string_lossy().into_owned()),
        path: code_info.map(|info| info.to_path().to_string_lossy().into_owned()),
        line: code_info.and_then(|info| info.line),
        module: Some(module.to_owned()),
        addr: 0,
        offset,
        lang: Lang::Native,
        inlined,
    };
    sym.inlined
        .iter()
        .rev()
        .map(|f| frame(&f.name, f.code_info.as_ref(), true))
        .chain(iter::once(frame(
            &sym.name,
            sym.code_info.as_deref(),
            false,
        )))
        .collect()
}
