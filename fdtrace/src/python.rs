//! CPython frames: which processes are CPython, where their interpreter lives, and what the
//! frames the probe copied mean (function, file, line).
//!
//! The probe copies, per Python frame, the code object's address and the last instruction
//! pointer (see fdtrace-ebpf/src/python.rs). Here those become `read_settings (app.py:7)`:
//! names and the line table are read from the process's memory once per code object, and the
//! frames replace the interpreter's evaluation frames in the native stack.

use std::{collections::HashMap, fs::File, os::unix::fs::FileExt as _, path::Path, sync::Arc};

use fdtrace_common::{PyFrame, PyOffsets, PyProc};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use crate::stack::{Frame, Lang};

/// Where things are in one CPython version's structures.
#[derive(Debug)]
pub struct Layout {
    pub version: (u8, u8),
    /// What the probe needs for its walk.
    pub probe: PyOffsets,
    code_firstlineno: u64,
    code_filename: u64,
    code_qualname: u64,
    code_linetable: u64,
    /// The bytecode starts inside the code object (`co_code_adaptive`).
    code_bytecode: u64,
    unicode_state: u64,
    /// Data of a compact ASCII string, after `PyASCIIObject`.
    unicode_ascii_data: u64,
    /// Data of a compact non-ASCII string, after `PyCompactUnicodeObject`.
    unicode_compact_data: u64,
    bytes_size: u64,
    bytes_data: u64,
}

/// The versions whose layouts are known. 3.11 was measured on the pyenv 3.11.7 build here
/// (DWARF of libpython3.11, `ptype /o` in gdb) and is tested against Debian's 3.11.2 too.
///
/// Not described yet: 3.10 keeps frames as `PyFrameObject`s linked by `f_back` with `f_lasti`
/// (a different walk in the probe), 3.12 moves the frame's owner flag and line-table details,
/// and 3.13 publishes its own offsets in `_PyRuntime.debug_offsets`, which is the way to
/// support it. Processes of those versions get native frames only.
pub static LAYOUTS: &[Layout] = &[Layout {
    version: (3, 11),
    probe: PyOffsets {
        runtime_interpreters_head: 40,
        interp_threads_head: 16,
        tstate_next: 8,
        tstate_native_thread_id: 160,
        tstate_cframe: 56,
        current_frame: 8,
        frame_code: 32,
        frame_previous: 48,
        frame_prev_instr: 56,
        frame_is_entry: 68,
    },
    code_firstlineno: 72,
    code_filename: 112,
    code_qualname: 128,
    code_linetable: 136,
    code_bytecode: 184,
    unicode_state: 32,
    unicode_ascii_data: 48,
    unicode_compact_data: 72,
    bytes_size: 16,
    bytes_data: 32,
}];

fn layout(version: (u8, u8)) -> Option<&'static Layout> {
    LAYOUTS.iter().find(|l| l.version == version)
}

/// The CPython version an object file is, from its name: `python3.11`, `libpython3.11.so.1.0`.
pub fn version_of(path: &str) -> Option<(u8, u8)> {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let name = Path::new(path).file_name()?.to_str()?;
    let rest = name
        .strip_prefix("libpython")
        .or_else(|| name.strip_prefix("python"))?;
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let tail = &rest[minor.len()..];
    if !(tail.is_empty() || tail.starts_with(".so") || tail == "d" || tail.starts_with("d.so")) {
        return None;
    }
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A CPython interpreter found in a process.
#[derive(Clone, Copy, Debug)]
pub struct Interpreter {
    pub layout: &'static Layout,
    pub proc: PyProc,
}

/// Looks for `_PyRuntime` in the object `path`, mapped executable at `start` from file offset
/// `pgoff`; `None` when it is not a CPython the table describes.
pub fn detect(path: &str, start: u64, pgoff: u64) -> Option<Interpreter> {
    let layout = layout(version_of(path)?)?;
    let data = std::fs::read(path).ok()?;
    let elf = object::File::parse(&*data).ok()?;
    let runtime = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .find(|s| s.name() == Ok("_PyRuntime"))?
        .address();
    // Every segment of an ELF object is loaded at the same bias: find it from the segment
    // the executable mapping came from.
    let page = |v: u64| v & !0xfff;
    let segment = elf
        .segments()
        .find(|s| page(s.file_range().0) == pgoff && s.size() > 0)?;
    let bias = start.checked_sub(page(segment.address()))?;
    Some(Interpreter {
        layout,
        proc: PyProc {
            runtime: bias + runtime,
            offsets: layout.probe,
        },
    })
}

/// Looks for a CPython interpreter among the executable mappings in /proc/PID/maps.
pub fn detect_in_process(pid: u32) -> Option<Interpreter> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    crate::stack::maps::parse_maps(&maps)
        .into_iter()
        .filter(|m| m.exec && !m.deleted)
        .find_map(|m| {
            let path = m.path.as_deref()?;
            version_of(path)?;
            detect(&format!("/proc/{pid}/root{path}"), m.start, m.offset)
                .or_else(|| detect(path, m.start, m.offset))
        })
}

/// A code object as read from the process.
#[derive(Debug)]
struct Code {
    qualname: String,
    filename: String,
    firstlineno: u32,
    linetable: Vec<u8>,
    bytecode: u64,
}

/// Resolves the frames the probe copied, per process, caching code objects by address.
#[derive(Default)]
pub struct Resolver {
    processes: HashMap<u32, (&'static Layout, Option<File>)>,
    codes: HashMap<(u32, u64), Option<Arc<Code>>>,
}

impl Resolver {
    pub fn register(&mut self, pid: u32, layout: &'static Layout) {
        let mem = File::open(format!("/proc/{pid}/mem")).ok();
        self.processes.insert(pid, (layout, mem));
        self.codes.retain(|(p, _), _| *p != pid);
    }

    /// A forked child: the same interpreter at the same addresses.
    pub fn fork(&mut self, parent: u32, child: u32) {
        if let Some((layout, _)) = self.processes.get(&parent) {
            let layout = *layout;
            self.register(child, layout);
        }
    }

    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.codes.retain(|(p, _), _| *p != pid);
    }

    /// Names the frames; `entry` tells where a C call into the interpreter began.
    pub fn resolve(&mut self, pid: u32, frames: &[PyFrame]) -> Vec<(Frame, bool)> {
        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            let address = f.code & !1;
            let entry = f.code & 1 != 0;
            let code = if let Some(code) = self.codes.get(&(pid, address)) {
                code.clone()
            } else {
                let code = self.read_code(pid, address).map(Arc::new);
                self.codes.insert((pid, address), code.clone());
                code
            };
            let frame = if let Some(code) = code {
                // prev_instr points at the last code unit executed (2 bytes each); before
                // the first one a frame has not started and has no line yet.
                let index = f.instr.checked_sub(code.bytecode).map(|b| b / 2);
                let line = index.and_then(|i| line_for(&code.linetable, code.firstlineno, i));
                Frame {
                    function: Some(code.qualname.clone()),
                    file: Path::new(&code.filename)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned()),
                    path: Some(code.filename.clone()),
                    line,
                    module: None,
                    addr: address,
                    offset: f.instr,
                    lang: Lang::Python,
                    inlined: false,
                }
            } else {
                Frame {
                    function: None,
                    file: None,
                    path: None,
                    line: None,
                    module: Some("<python>".into()),
                    addr: address,
                    offset: f.instr,
                    lang: Lang::Python,
                    inlined: false,
                }
            };
            out.push((frame, entry));
        }
        out
    }

    fn read_code(&self, pid: u32, address: u64) -> Option<Code> {
        let (layout, mem) = self.processes.get(&pid)?;
        let mem = mem.as_ref()?;
        let word = |at: u64| read_u64(mem, at);
        let firstlineno = read_u64(mem, address + layout.code_firstlineno)? as u32;
        let qualname = read_str(mem, layout, word(address + layout.code_qualname)?)?;
        let filename = read_str(mem, layout, word(address + layout.code_filename)?)?;
        let table = word(address + layout.code_linetable)?;
        let len = word(table + layout.bytes_size)?;
        let linetable = read_bytes(mem, table + layout.bytes_data, len.min(1 << 20) as usize)?;
        Some(Code {
            qualname,
            filename,
            firstlineno,
            linetable,
            bytecode: address + layout.code_bytecode,
        })
    }
}

fn read_bytes(mem: &File, at: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0; len];
    mem.read_exact_at(&mut buf, at).ok()?;
    Some(buf)
}

fn read_u64(mem: &File, at: u64) -> Option<u64> {
    let b = read_bytes(mem, at, 8)?;
    Some(u64::from_ne_bytes(b.try_into().ok()?))
}

/// A `str` object's text: compact ASCII, or compact with 1, 2 or 4 bytes per character.
fn read_str(mem: &File, layout: &Layout, at: u64) -> Option<String> {
    let len = read_u64(mem, at + 16)?.min(4096) as usize;
    let state = read_u64(mem, at + layout.unicode_state)? as u32;
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact {
        return None;
    }
    if ascii {
        let bytes = read_bytes(mem, at + layout.unicode_ascii_data, len)?;
        return String::from_utf8(bytes).ok();
    }
    let width = match kind {
        1 | 2 | 4 => kind as usize,
        _ => return None,
    };
    let bytes = read_bytes(mem, at + layout.unicode_compact_data, len * width)?;
    Some(
        bytes
            .chunks(width)
            .filter_map(|c| {
                let mut v = [0u8; 4];
                v[..width].copy_from_slice(c);
                char::from_u32(u32::from_le_bytes(v))
            })
            .collect(),
    )
}

/// The line of code unit `index` from a 3.11 location table (Objects/locations.md in CPython):
/// entries of `(byte & 7) + 1` code units whose code `(byte >> 3) & 15` says how the line moves.
pub fn line_for(table: &[u8], firstlineno: u32, index: u64) -> Option<u32> {
    let mut line = i64::from(firstlineno);
    let mut at = 0u64;
    let mut i = 0;
    while i < table.len() {
        let first = table[i];
        i += 1;
        let code = (first >> 3) & 15;
        let units = u64::from(first & 7) + 1;
        let mut varint = || {
            let mut value = 0u64;
            let mut shift = 0;
            while i < table.len() {
                let b = table[i];
                i += 1;
                value |= u64::from(b & 63) << shift;
                shift += 6;
                if b & 64 == 0 {
                    break;
                }
            }
            value
        };
        let delta = match code {
            15 => None, // no location
            14 | 13 => {
                let v = varint();
                let d = if v & 1 == 1 {
                    -((v >> 1) as i64)
                } else {
                    (v >> 1) as i64
                };
                if code == 14 {
                    varint(); // end line
                    varint(); // start column
                    varint(); // end column
                }
                Some(d)
            }
            10..=12 => {
                i += 2; // start and end column
                Some(i64::from(code) - 10)
            }
            _ => {
                i += 1; // column
                Some(0)
            }
        };
        if let Some(d) = delta {
            line += d;
        }
        if index < at + units {
            return (delta.is_some() && line > 0).then_some(line as u32);
        }
        at += units;
    }
    None
}

/// A native frame inside the interpreter itself (libpython, or a python binary with the
/// interpreter linked in).
pub fn is_interpreter_frame(f: &Frame) -> bool {
    f.lang == Lang::Native
        && f.module
            .as_deref()
            .is_some_and(|m| m.starts_with("libpython") || version_of(m).is_some())
}

/// Replaces each interpreter evaluation frame in `native` (innermost first) with the Python
/// frames it was running: the Python frames come in groups ending at an entry frame, one group
/// per `_PyEval_EvalFrameDefault` call. Groups left over (a stack copy that ended early) go
/// after the native frames.
pub fn merge(native: Vec<Frame>, python: Vec<(Frame, bool)>) -> Vec<Frame> {
    if python.is_empty() {
        return native;
    }
    let mut groups: Vec<Vec<Frame>> = Vec::new();
    let mut current = Vec::new();
    for (frame, entry) in python {
        current.push(frame);
        if entry {
            groups.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    let mut groups = groups.into_iter();
    let mut out = Vec::with_capacity(native.len() + 8);
    for frame in native {
        if frame.function.as_deref() == Some("_PyEval_EvalFrameDefault") {
            match groups.next() {
                Some(group) => out.extend(group),
                None => out.push(frame),
            }
        } else {
            out.push(frame);
        }
    }
    out.extend(groups.flatten());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_names() {
        assert_eq!(version_of("/usr/bin/python3.11"), Some((3, 11)));
        assert_eq!(version_of("/x/lib/libpython3.11.so.1.0"), Some((3, 11)));
        assert_eq!(version_of("/usr/lib/libpython3.12d.so"), Some((3, 12)));
        assert_eq!(version_of("/usr/bin/python3"), None);
        assert_eq!(version_of("/usr/bin/python3.11-config"), None);
    }

    #[test]
    fn line_table_of_a_real_function() {
        // def f():          # line 1
        //     x = 1
        //     y = [x,
        //          2]
        //     return x
        // f.__code__.co_linetable and co_lines() from CPython 3.11.7: code unit -> line.
        let table = [
            128, 0, 216, 8, 9, 128, 65, 216, 9, 10, 216, 9, 10, 240, 3, 1, 9, 12, 128, 65, 224, 11,
            12, 128, 72,
        ];
        let expected = [1, 2, 2, 3, 4, 3, 3, 5, 5];
        for (unit, line) in expected.iter().enumerate() {
            assert_eq!(
                line_for(&table, 1, unit as u64),
                Some(*line),
                "code unit {unit}"
            );
        }
        assert_eq!(line_for(&table, 1, 9), None);
    }

    fn frame(name: &str, lang: Lang) -> Frame {
        Frame {
            function: Some(name.into()),
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

    #[test]
    fn python_groups_replace_eval_frames() {
        let native = [
            "open64",
            "_io_open",
            "_PyEval_EvalFrameDefault",
            "call",
            "_PyEval_EvalFrameDefault",
            "main",
        ]
        .map(|n| frame(n, Lang::Native))
        .to_vec();
        let python = vec![
            (frame("read_settings", Lang::Python), false),
            (frame("handler", Lang::Python), true),
            (frame("<module>", Lang::Python), true),
        ];
        let merged: Vec<String> = merge(native, python)
            .into_iter()
            .map(|f| f.function.unwrap())
            .collect();
        assert_eq!(
            merged,
            [
                "open64",
                "_io_open",
                "read_settings",
                "handler",
                "call",
                "<module>",
                "main"
            ]
        );
    }
}
