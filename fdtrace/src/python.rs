//! CPython frames: which processes are CPython, where their interpreter lives, and what the
//! frames the probe copied mean (function, file, line).
//!
//! The probe copies, per Python frame, the code object's address (with the frame's owner bits)
//! and its instruction word (see fdtrace-ebpf/src/python.rs). Here those become
//! `read_settings (app.py:7)`, per the version's `Layout`: names and the line table are read
//! from the process's memory once per code object, and the frames replace the interpreter's
//! evaluation frames in the native stack.

use std::{collections::HashMap, fs::File, os::unix::fs::FileExt as _, path::Path, sync::Arc};

use fdtrace_common::{PyFrame, PyOffsets, PyProc};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use crate::stack::{Frame, Lang};

/// How a version marks where a C call into the interpreter began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    /// 3.11: the copied byte is `is_entry`.
    Flag,
    /// 3.12+: the copied byte is `owner`; a C call into the eval loop pushes a shim frame owned
    /// by the C stack (`FRAME_OWNED_BY_CSTACK`, this value) below the first frame it evaluates.
    Shim(u8),
    /// 3.10: every frame is evaluated by its own C-level `_PyEval_EvalFrameDefault` call.
    Every,
}

/// What the copied instruction word is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instr {
    /// A pointer to a code unit (2 bytes) of the bytecode inside the code object
    /// (`co_code_adaptive`, this many bytes in): the last one executed (`prev_instr`, 3.11,
    /// 3.12) or the current one (`instr_ptr`, 3.13), which share their instruction's location.
    Pointer(u64),
    /// The low 32 bits are `f_lasti`, a signed index in code units (3.10; -1 before the
    /// first instruction).
    Index,
}

/// The format of `co_linetable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lines {
    /// 3.11+: the location table (Objects/locations.md), indexed by code unit.
    Locations,
    /// 3.10: PEP 626 (sdelta, ldelta) byte pairs (Objects/lnotab_notes.txt), by byte offset.
    Pep626,
}

/// Where things are in one CPython version's structures.
#[derive(Debug)]
pub struct Layout {
    pub version: (u8, u8),
    /// What the probe needs for its walk.
    pub probe: PyOffsets,
    pub entries: Entries,
    pub instr: Instr,
    pub lines: Lines,
    code_firstlineno: u64,
    code_filename: u64,
    /// `co_qualname` (3.11+) or `co_name` (3.10, which has no qualified name).
    code_qualname: u64,
    code_linetable: u64,
    unicode_length: u64,
    unicode_state: u64,
    /// Data of a compact ASCII string, after `PyASCIIObject`.
    unicode_ascii_data: u64,
    /// Data of a compact non-ASCII string, after `PyCompactUnicodeObject`.
    unicode_compact_data: u64,
    bytes_size: u64,
    bytes_data: u64,
}

impl Layout {
    /// Every number of the layout by the name tests/fixtures/py_offsets.c prints it under,
    /// for checking the table against a version's headers.
    pub fn named_offsets(&self) -> Vec<(&'static str, u64)> {
        let p = &self.probe;
        let mut all = vec![
            (
                "runtime_interpreters_head",
                u64::from(p.runtime_interpreters_head),
            ),
            ("interp_threads_head", u64::from(p.interp_threads_head)),
            ("tstate_next", u64::from(p.tstate_next)),
            ("tstate_thread_id", u64::from(p.tstate_thread_id)),
            ("tstate_cframe", u64::from(p.tstate_cframe)),
            ("current_frame", u64::from(p.current_frame)),
            ("frame_code", u64::from(p.frame_code)),
            ("frame_previous", u64::from(p.frame_previous)),
            ("frame_instr", u64::from(p.frame_instr)),
            ("frame_owner", u64::from(p.frame_owner)),
            ("code_firstlineno", self.code_firstlineno),
            ("code_filename", self.code_filename),
            ("code_qualname", self.code_qualname),
            ("code_linetable", self.code_linetable),
            ("unicode_length", self.unicode_length),
            ("unicode_state", self.unicode_state),
            ("unicode_ascii_data", self.unicode_ascii_data),
            ("unicode_compact_data", self.unicode_compact_data),
            ("unicode_kind_shift", u64::from(UNICODE_KIND_SHIFT)),
            ("unicode_compact_bit", u64::from(UNICODE_COMPACT_BIT)),
            ("unicode_ascii_bit", u64::from(UNICODE_ASCII_BIT)),
            ("bytes_size", self.bytes_size),
            ("bytes_data", self.bytes_data),
        ];
        if let Instr::Pointer(bytecode) = self.instr {
            all.push(("code_bytecode", bytecode));
        }
        if let Entries::Shim(owner) = self.entries {
            all.push(("owned_by_cstack", u64::from(owner)));
        }
        all
    }
}

/// Bits of `PyASCIIObject.state`, the same in 3.10 to 3.13.
const UNICODE_KIND_SHIFT: u32 = 2;
const UNICODE_COMPACT_BIT: u32 = 5;
const UNICODE_ASCII_BIT: u32 = 6;

/// Offset of `tid` in glibc's `struct pthread`, whose address is a `pthread_t`: what 3.10's
/// thread states record instead of the kernel thread id. glibc publishes it for libthread_db
/// as `_thread_db_pthread_tid` (720 on x86-64 since the NPTL rewrite; checked in
/// tests/python.rs); elsewhere 3.10 is not described.
#[cfg(target_arch = "x86_64")]
const GLIBC_PTHREAD_TID: u32 = 720;
#[cfg(not(target_arch = "x86_64"))]
const GLIBC_PTHREAD_TID: u32 = 0;

/// The versions whose layouts are known: the numbers are `offsetof`s from each version's
/// headers (tests/fixtures/py_offsets.c prints them; tests/python.rs compares them with this
/// table for every interpreter installed), measured on pyenv's 3.10.13, 3.11.7, 3.12.1 and
/// 3.13.0 and Debian's 3.11.2. Struct layouts do not change within a minor version.
pub static LAYOUTS: &[Layout] = &[
    Layout {
        version: (3, 10),
        probe: PyOffsets {
            runtime_interpreters_head: 32,
            interp_threads_head: 8,
            tstate_next: 8,
            tstate_thread_id: 176,
            thread_tid: GLIBC_PTHREAD_TID,
            tstate_cframe: 0,
            current_frame: 24,
            frame_code: 32,
            frame_previous: 24,
            frame_instr: 96,
            // f_state: copied, not used.
            frame_owner: 108,
            pad: 0,
        },
        entries: Entries::Every,
        instr: Instr::Index,
        lines: Lines::Pep626,
        code_firstlineno: 40,
        code_filename: 104,
        code_qualname: 112,
        code_linetable: 120,
        unicode_length: 16,
        unicode_state: 32,
        unicode_ascii_data: 48,
        unicode_compact_data: 72,
        bytes_size: 16,
        bytes_data: 32,
    },
    Layout {
        version: (3, 11),
        probe: PyOffsets {
            runtime_interpreters_head: 40,
            interp_threads_head: 16,
            tstate_next: 8,
            tstate_thread_id: 160,
            thread_tid: 0,
            tstate_cframe: 56,
            current_frame: 8,
            frame_code: 32,
            frame_previous: 48,
            frame_instr: 56,
            frame_owner: 68,
            pad: 0,
        },
        entries: Entries::Flag,
        instr: Instr::Pointer(184),
        lines: Lines::Locations,
        code_firstlineno: 72,
        code_filename: 112,
        code_qualname: 128,
        code_linetable: 136,
        unicode_length: 16,
        unicode_state: 32,
        unicode_ascii_data: 48,
        unicode_compact_data: 72,
        bytes_size: 16,
        bytes_data: 32,
    },
    Layout {
        version: (3, 12),
        probe: PyOffsets {
            runtime_interpreters_head: 40,
            interp_threads_head: 72,
            tstate_next: 8,
            tstate_thread_id: 144,
            thread_tid: 0,
            tstate_cframe: 56,
            current_frame: 0,
            frame_code: 0,
            frame_previous: 8,
            frame_instr: 56,
            frame_owner: 70,
            pad: 0,
        },
        entries: Entries::Shim(3),
        instr: Instr::Pointer(192),
        lines: Lines::Locations,
        code_firstlineno: 68,
        code_filename: 112,
        code_qualname: 128,
        code_linetable: 136,
        unicode_length: 16,
        unicode_state: 32,
        unicode_ascii_data: 40,
        unicode_compact_data: 56,
        bytes_size: 16,
        bytes_data: 32,
    },
    Layout {
        version: (3, 13),
        probe: PyOffsets {
            runtime_interpreters_head: 632,
            interp_threads_head: 7344,
            tstate_next: 8,
            tstate_thread_id: 160,
            thread_tid: 0,
            tstate_cframe: 0,
            current_frame: 72,
            frame_code: 0,
            frame_previous: 8,
            frame_instr: 56,
            frame_owner: 70,
            pad: 0,
        },
        entries: Entries::Shim(3),
        instr: Instr::Pointer(200),
        lines: Lines::Locations,
        code_firstlineno: 68,
        code_filename: 112,
        code_qualname: 128,
        code_linetable: 136,
        unicode_length: 16,
        unicode_state: 32,
        unicode_ascii_data: 40,
        unicode_compact_data: 56,
        bytes_size: 16,
        bytes_data: 32,
    },
];

fn layout(version: (u8, u8)) -> Option<&'static Layout> {
    LAYOUTS
        .iter()
        // Without the descriptor's tid offset a 3.10 thread cannot be told from another.
        .find(|l| l.version == version && (l.version >= (3, 11) || l.probe.thread_tid != 0))
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

/// Looks for `_PyRuntime` in the object `path` (as process `pid` sees it: read through its
/// root first, which is another file system in a container), mapped executable at `start`
/// from file offset `pgoff`; `None` when it is not a CPython the table describes.
pub fn detect(pid: u32, path: &str, start: u64, pgoff: u64) -> Option<Interpreter> {
    let mut found = detect_object(&format!("/proc/{pid}/root{path}"), start, pgoff)
        .or_else(|| detect_object(path, start, pgoff))?;
    (found.proc.pidns_dev, found.proc.pidns_ino) = foreign_pid_namespace(pid).unwrap_or((0, 0));
    Some(found)
}

/// A new [`PyProc::generation`]: code objects the probe announced under an earlier
/// registration of a pid (an earlier program, or process) are announced again.
fn next_generation() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The pid namespace of `pid` (nsfs device and inode) when it is not ours.
fn foreign_pid_namespace(pid: u32) -> Option<(u64, u64)> {
    let theirs = crate::procfs::namespace(&pid.to_string(), "pid")?;
    (Some(theirs) != crate::procfs::namespace("self", "pid")).then_some(theirs)
}

fn detect_object(path: &str, start: u64, pgoff: u64) -> Option<Interpreter> {
    let layout = layout(version_of(path)?)?;
    let object = runtime_symbol(path)?;
    // Every segment of an ELF object is loaded at the same bias: find it from the segment
    // the executable mapping came from.
    let page = |v: u64| v & !0xfff;
    let segment_address = object
        .segments
        .iter()
        .find(|(offset, _)| page(*offset) == pgoff)
        .map(|(_, address)| *address)?;
    let bias = start.checked_sub(page(segment_address))?;
    Some(Interpreter {
        layout,
        proc: PyProc {
            runtime: bias + object.runtime,
            offsets: layout.probe,
            code_qualname: layout.code_qualname as u16,
            code_filename: layout.code_filename as u16,
            code_linetable: layout.code_linetable as u16,
            generation: next_generation(),
            ..PyProc::default()
        },
    })
}

/// Reads ahead what `detect` will need when `command` (a launched program) turns out to be a
/// CPython: its executable, and the libpython next to it (pyenv's `bin/../lib`, Debian's
/// `/usr/lib/x86_64-linux-gnu`). The mapping reports then find the runtime at once, which
/// otherwise took longer than the interpreter's start before the script's first lines.
pub fn warm(command: &str) {
    let exe = if command.contains('/') {
        std::path::PathBuf::from(command)
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        match std::env::split_paths(&path)
            .map(|dir| dir.join(command))
            .find(|p| p.is_file())
        {
            Some(exe) => exe,
            None => return,
        }
    };
    let Ok(exe) = exe.canonicalize() else {
        return;
    };
    let Some(version) = exe.to_str().and_then(version_of) else {
        return;
    };
    let _ = runtime_symbol(exe.to_str().unwrap_or_default());
    let lib = format!("libpython3.{}.so.1.0", version.1);
    let dirs = [
        exe.parent().and_then(Path::parent).map(|p| p.join("lib")),
        Some(std::path::PathBuf::from("/usr/lib/x86_64-linux-gnu")),
    ];
    for dir in dirs.into_iter().flatten() {
        if let Some(path) = dir.join(&lib).to_str() {
            let _ = runtime_symbol(path);
        }
    }
}

/// What `detect` needs of an object file, whatever its load address.
#[derive(Clone)]
struct RuntimeSymbol {
    /// `_PyRuntime`'s address in the object.
    runtime: u64,
    /// (file offset, address) of each non-empty segment.
    segments: Vec<(u64, u64)>,
}

/// Objects looked at, keyed by identity (device, inode, size, modification time): every
/// process of a server runs the same few, and the first lines of a launched script run while
/// the probe waits for this answer.
type ObjectKey = (u64, u64, u64, i64);
static RUNTIME_SYMBOLS: std::sync::Mutex<Option<HashMap<ObjectKey, Option<RuntimeSymbol>>>> =
    std::sync::Mutex::new(None);
/// Distinct interpreter objects remembered; past this the cache starts over.
const RUNTIME_SYMBOLS_MAX: usize = 256;

fn runtime_symbol(path: &str) -> Option<RuntimeSymbol> {
    use std::os::unix::fs::MetadataExt as _;
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
    );
    let mut cache = RUNTIME_SYMBOLS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cache = cache.get_or_insert_with(HashMap::default);
    if let Some(known) = cache.get(&key) {
        return known.clone();
    }
    let found = read_runtime_symbol(file);
    if cache.len() >= RUNTIME_SYMBOLS_MAX {
        cache.clear();
    }
    cache.insert(key, found.clone());
    found
}

fn read_runtime_symbol(file: File) -> Option<RuntimeSymbol> {
    // Only the headers and the symbol tables are read, not the whole (tens of MB) object: the
    // sooner the probe knows the interpreter, the fewer of the process's first records (and
    // forks, which copy it) go without Python frames.
    let data = object::read::ReadCache::new(file);
    let elf = object::File::parse(&data).ok()?;
    let mut runtime = None;
    for s in elf.dynamic_symbols() {
        match s.name() {
            Ok("_PyRuntime") if s.is_definition() => runtime = Some(s.address()),
            // A python binary linked against libpython imports its entry point: libpython has
            // the runtime. Checked first because the full symbol table of a python binary is
            // large (tens of ms to search in a debug build).
            Ok("_PyRuntime" | "Py_BytesMain") if s.is_undefined() => return None,
            _ => {}
        }
    }
    let runtime = match runtime {
        Some(address) => address,
        None => elf
            .symbols()
            .find(|s| s.name() == Ok("_PyRuntime") && s.is_definition())?
            .address(),
    };
    let segments = elf
        .segments()
        .filter(|s| s.size() > 0)
        .map(|s| (s.file_range().0, s.address()))
        .collect();
    Some(RuntimeSymbol { runtime, segments })
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
            detect(pid, path, m.start, m.offset)
        })
}

/// A code object as read from the process.
#[derive(Debug)]
struct Code {
    qualname: String,
    filename: String,
    firstlineno: u32,
    linetable: Vec<u8>,
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
        let layout = self.processes.get(&pid).map(|(l, _)| *l);
        // A process forgotten with records in flight: its frames stay unnamed addresses.
        let kind = layout.map_or(Entries::Flag, |l| l.entries);
        let mut out = Vec::with_capacity(frames.len());
        for (f, entry) in entries(kind, frames) {
            let address = f.code & !7;
            let code = if let Some(code) = self.codes.get(&(pid, address)) {
                code.clone()
            } else {
                let code = self.read_code(pid, address).map(Arc::new);
                self.codes.insert((pid, address), code.clone());
                code
            };
            let frame = if let (Some(code), Some(layout)) = (code, layout) {
                let line = line_of(layout, &code, address, f.instr);
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
        read_code(&Memory::Process(mem.as_ref()?), layout, address)
    }

    /// Takes what the probe copied of a code object `pid` ran when it first saw it: the
    /// object's start and the objects its name, file and line table point to, each with its
    /// address. The process may be gone by the time its records are read (a script that leaks
    /// and exits at once); these let its frames be named anyway.
    pub fn learn_code(&mut self, pid: u32, address: u64, copies: &[(u64, &[u8])]) {
        let Some((layout, _)) = self.processes.get(&pid) else {
            return;
        };
        if let Some(code) = read_code(&Memory::Copies(copies), layout, address) {
            self.codes.insert((pid, address), Some(Arc::new(code)));
        }
    }
}

/// Where a code object and the objects it points to are read from.
enum Memory<'a> {
    /// The live process, through /proc/PID/mem.
    Process(&'a File),
    /// Copies the probe made: (address, bytes) each.
    Copies(&'a [(u64, &'a [u8])]),
}

impl Memory<'_> {
    fn read(&self, at: u64, len: usize) -> Option<Vec<u8>> {
        match self {
            Memory::Process(mem) => {
                let mut buf = vec![0; len];
                mem.read_exact_at(&mut buf, at).ok()?;
                Some(buf)
            }
            Memory::Copies(copies) => copies.iter().find_map(|&(base, bytes)| {
                let start = usize::try_from(at.checked_sub(base)?).ok()?;
                Some(bytes.get(start..start.checked_add(len)?)?.to_vec())
            }),
        }
    }

    fn u64_at(&self, at: u64) -> Option<u64> {
        let b = self.read(at, 8)?;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    }
}

fn read_code(mem: &Memory<'_>, layout: &Layout, address: u64) -> Option<Code> {
    let word = |at: u64| mem.u64_at(at);
    // An int: the low half of the word on a little-endian machine.
    let firstlineno = word(address.wrapping_add(layout.code_firstlineno))? as u32;
    let qualname = read_str(
        mem,
        layout,
        word(address.wrapping_add(layout.code_qualname))?,
    )?;
    let filename = read_str(
        mem,
        layout,
        word(address.wrapping_add(layout.code_filename))?,
    )?;
    let table = word(address.wrapping_add(layout.code_linetable))?;
    let len = word(table.wrapping_add(layout.bytes_size))?;
    let linetable = mem.read(
        table.wrapping_add(layout.bytes_data),
        len.min(1 << 20) as usize,
    )?;
    Some(Code {
        qualname,
        filename,
        firstlineno,
        linetable,
    })
}

/// The Python frames among `frames` (innermost first), each with whether it is where a C call
/// into the interpreter began, from the owner bits the probe put in the code address.
fn entries(entries: Entries, frames: &[PyFrame]) -> Vec<(&PyFrame, bool)> {
    let mut out: Vec<(&PyFrame, bool)> = Vec::with_capacity(frames.len());
    for f in frames {
        let owner = f.code & 7;
        let entry = match entries {
            Entries::Flag => owner & 1 != 0,
            Entries::Every => true,
            Entries::Shim(shim) if owner == u64::from(shim) => {
                // Not a Python function: the frame linking to it is where this C call into
                // the interpreter began.
                if let Some((_, entry)) = out.last_mut() {
                    *entry = true;
                }
                continue;
            }
            Entries::Shim(_) => false,
        };
        out.push((f, entry));
    }
    out
}

/// The line a frame is at, from the instruction word the probe copied.
fn line_of(layout: &Layout, code: &Code, address: u64, word: u64) -> Option<u32> {
    let unit = match layout.instr {
        // Before the first code unit a frame has not started and has no line yet.
        Instr::Pointer(bytecode) => word.checked_sub(address.wrapping_add(bytecode))? / 2,
        Instr::Index => match word as u32 as i32 {
            i @ 0.. => i as u64,
            // f_lasti is -1 before the first instruction, where CPython names the first line.
            _ => return Some(code.firstlineno),
        },
    };
    match layout.lines {
        Lines::Locations => line_for(&code.linetable, code.firstlineno, unit),
        Lines::Pep626 => line_for_310(&code.linetable, code.firstlineno, unit),
    }
}

/// A `str` object's text: compact ASCII, or compact with 1, 2 or 4 bytes per character.
///
/// Addresses come from another process's memory and may be garbage (a code object freed
/// since its frame was captured): arithmetic on them wraps, and the read then fails.
fn read_str(mem: &Memory<'_>, layout: &Layout, at: u64) -> Option<String> {
    let len = mem
        .u64_at(at.wrapping_add(layout.unicode_length))?
        .min(4096) as usize;
    let state = mem.u64_at(at.wrapping_add(layout.unicode_state))? as u32;
    let kind = (state >> UNICODE_KIND_SHIFT) & 7;
    let compact = state & (1 << UNICODE_COMPACT_BIT) != 0;
    let ascii = state & (1 << UNICODE_ASCII_BIT) != 0;
    if !compact {
        return None;
    }
    if ascii {
        let bytes = mem.read(at.wrapping_add(layout.unicode_ascii_data), len)?;
        return String::from_utf8(bytes).ok();
    }
    let width = match kind {
        1 | 2 | 4 => kind as usize,
        _ => return None,
    };
    let bytes = mem.read(at.wrapping_add(layout.unicode_compact_data), len * width)?;
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
                // A table read from a process can be garbage: bits past 64 are dropped.
                if shift < 64 {
                    value |= u64::from(b & 63) << shift;
                }
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
            line = line.saturating_add(d);
        }
        if index < at + units {
            return (delta.is_some() && line > 0).then_some(line as u32);
        }
        at += units;
    }
    None
}

/// The line of code unit `index` from a 3.10 line table (PEP 626; Objects/lnotab_notes.txt in
/// CPython 3.10): byte pairs of an unsigned byte-offset delta ending a range and a signed line
/// delta for it, -128 meaning the range has no line. Ranges are in bytes, 2 per code unit.
pub fn line_for_310(table: &[u8], firstlineno: u32, index: u64) -> Option<u32> {
    let offset = index.checked_mul(2)?;
    let mut line = i64::from(firstlineno);
    let mut end = 0u64;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += u64::from(pair[0]);
        let delta = pair[1] as i8;
        // Line deltas of empty ranges still count: long jumps are split over several pairs.
        let current = (delta != -128).then(|| {
            line += i64::from(delta);
            line
        });
        if (start..end).contains(&offset) {
            return current
                .and_then(|l| u32::try_from(l).ok())
                .filter(|&l| l > 0);
        }
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

    /// Line tables are read from another process and may be garbage (a code object freed
    /// since): naming must give up, not panic (a debug build of the matrix's emulated 6.1 hit
    /// an overflow here).
    #[test]
    fn garbage_line_tables_give_no_line_rather_than_a_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for len in 0..300 {
            let table: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8 | 0x40
                })
                .collect();
            let _ = line_for(&table, u32::MAX, u64::MAX / 2);
            let _ = line_for(&table, 1, len as u64);
            let _ = line_for_310(&table, u32::MAX, u64::MAX / 4);
        }
        assert_eq!(line_for(&[0xff; 64], 1, 3), None);
    }

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

    type Decoder = fn(&[u8], u32, u64) -> Option<u32>;

    #[test]
    fn line_tables_of_real_functions() {
        // def f(a):             # line 1
        //     x = 1
        //     y = [x,
        //          2]
        //     if a:
        //         return x
        //     for i in range(3):
        //         y.append(i)
        //     return y
        // f.__code__.co_linetable and co_lines() from pyenv's 3.10.13, 3.12.1 and 3.13.0.
        let table_310 = [4, 1, 2, 1, 2, 1, 4, 255, 4, 2, 4, 1, 12, 1, 12, 1, 4, 1];
        let lines_310 = [
            2, 2, 3, 4, 3, 3, 5, 5, 6, 6, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 9, 9,
        ];
        let table_312 = [
            128, 0, 216, 8, 9, 128, 65, 216, 9, 10, 216, 9, 10, 240, 3, 1, 9, 12, 128, 65, 225, 7,
            8, 216, 15, 16, 136, 8, 220, 13, 18, 144, 49, 139, 88, 242, 0, 1, 5, 20, 136, 1, 216,
            8, 9, 143, 8, 137, 8, 144, 17, 141, 11, 240, 3, 1, 5, 20, 224, 11, 12, 128, 72,
        ];
        let lines_312 = [
            1, 2, 2, 3, 4, 3, 3, 5, 5, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8,
            8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 7, 9, 9,
        ];
        let table_313 = [
            128, 0, 216, 8, 9, 128, 65, 216, 9, 10, 216, 9, 10, 240, 3, 1, 9, 12, 128, 65, 230, 7,
            8, 216, 15, 16, 136, 8, 220, 13, 18, 144, 49, 142, 88, 136, 1, 216, 8, 9, 143, 8, 137,
            8, 144, 17, 142, 11, 241, 3, 0, 14, 22, 224, 11, 12, 128, 72,
        ];
        let lines_313 = [
            1, 2, 2, 3, 4, 3, 3, 5, 5, 5, 5, 5, 5, 5, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
            7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 7, 7, 9, 9,
        ];
        let cases: [(&str, Decoder, &[u8], &[u32]); 3] = [
            ("3.10", line_for_310, &table_310, &lines_310),
            ("3.12", line_for, &table_312, &lines_312),
            ("3.13", line_for, &table_313, &lines_313),
        ];
        for (version, decode, table, lines) in cases {
            for (unit, line) in lines.iter().enumerate() {
                assert_eq!(
                    decode(table, 1, unit as u64),
                    Some(*line),
                    "{version} code unit {unit}"
                );
            }
            assert_eq!(decode(table, 1, lines.len() as u64), None, "{version}");
        }
    }

    fn py(code: u64) -> PyFrame {
        PyFrame { code, instr: 0 }
    }

    #[test]
    fn entries_per_version() {
        // 3.12+: innermost first, two frames of one eval call, its shim (owner 3), then the
        // outer call's frame and its shim.
        let frames = [py(0x1000), py(0x2000), py(0x3003), py(0x4000), py(0x3003)];
        let seen: Vec<(u64, bool)> = entries(Entries::Shim(3), &frames)
            .into_iter()
            .map(|(f, e)| (f.code & !7, e))
            .collect();
        assert_eq!(seen, [(0x1000, false), (0x2000, true), (0x4000, true)]);
        // Generator-owned frames (owner 1) are ordinary frames.
        let seen: Vec<bool> = entries(Entries::Shim(3), &[py(0x1001), py(0x2003)])
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(seen, [true]);
        let seen: Vec<bool> = entries(Entries::Flag, &[py(0x1000), py(0x2001)])
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(seen, [false, true]);
        // 3.10 copies f_state's bits, which say nothing about entries.
        let seen: Vec<bool> = entries(Entries::Every, &[py(0x1000), py(0x2007)])
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(seen, [true, true]);
    }

    #[test]
    fn instruction_words_per_version() {
        let code = |firstlineno| Code {
            qualname: String::new(),
            filename: String::new(),
            firstlineno,
            linetable: vec![4, 1, 2, 1],
        };
        let l310 = layout((3, 10)).unwrap();
        // f_lasti 2 (code unit 2, byte 4) with f_lineno above it.
        assert_eq!(line_of(l310, &code(10), 0, (7 << 32) | 2), Some(12));
        assert_eq!(line_of(l310, &code(10), 0, 0xffff_ffff), Some(10));
        let l312 = layout((3, 12)).unwrap();
        let base = 0x1000 + 192;
        let table = Code {
            linetable: vec![128, 0, 216, 8, 9],
            ..code(1)
        };
        assert_eq!(line_of(l312, &table, 0x1000, base + 2), Some(2));
        assert_eq!(line_of(l312, &table, 0x1000, base - 2), None);
    }

    fn frame(name: &str, lang: Lang) -> Frame {
        Frame::named(name, lang)
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
