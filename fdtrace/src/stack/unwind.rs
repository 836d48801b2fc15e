//! Userspace unwinding of the stack copies the probes record, with each object's `.eh_frame`
//! (PLATFORM.md, "Stacks: frame pointers are not enough").

use foldhash::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{Module, Unwinder as _};

use super::RawFrame;
use super::code_object::CodeObject;
use super::maps::{MapEntry, parse_maps};

/// Deeper stacks are cut here; a leak's call site is near the top.
const MAX_FRAMES: usize = 128;

/// How often an address outside the known mappings may make us reread one process's maps.
/// Bounds the cost when the addresses are garbage (a frame without unwind info) rather than
/// a library loaded since the last read.
const MIN_REREAD_INTERVAL: Duration = Duration::from_millis(50);

/// Reads of a process's maps allowed without `MIN_REREAD_INTERVAL` between them. A process
/// attached as it execs (one a selection adopted) is read before its loader has mapped its
/// libraries, and its first creations come within a millisecond: held to the interval, their
/// stacks stayed unresolved.
const EARLY_REREADS: u32 = 4;

/// framehop tags its rule cache with a global u16 generation, bumped on every `add_module`;
/// after 65536 bumps a stale rule could match again. Start a fresh cache well before.
const MODULES_PER_CACHE: u32 = 30_000;

/// Past this many files kept open for symbolizing containers' modules, they start over.
const MAX_FOREIGN_FILES: usize = 1024;

/// Past this many parsed objects, those no process maps any more are dropped.
const MAX_CACHED_OBJECTS: usize = 512;

/// The shared vDSO is the same image in every 64-bit process of a kernel.
const VDSO: &str = "[vdso]";

/// Identity of a mapped file: the path alone is not enough (a package upgrade replaces the
/// file), and the inode alone is not either (inode numbers repeat across devices).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectKey {
    path: Arc<str>,
    dev: u64,
    inode: u64,
}

/// An executable mapping: the only places an instruction pointer may be.
#[derive(Debug)]
struct CodeMapping {
    start: u64,
    end: u64,
    offset: u64,
    /// What `RawFrame::module` says for addresses in here.
    module: Option<Arc<str>>,
}

/// One address space as of the last read of its maps. Shared by a parent and the children it
/// forks until they exec.
struct AddressSpace {
    /// Unique for the unwinder's life: unwinding repeats while this stays the same.
    id: u64,
    /// The executable lines of the maps, to tell whether a reread changed anything.
    entries: Vec<MapEntry>,
    /// Sorted by `start`, disjoint.
    code: Vec<CodeMapping>,
    unwinder: UnwinderX86_64<Arc<[u8]>>,
    /// Keeps the objects alive for the cache's pruning.
    _objects: Vec<Arc<CodeObject>>,
}

impl AddressSpace {
    fn code_mapping(&self, addr: u64) -> Option<&CodeMapping> {
        let i = self.code.partition_point(|m| m.start <= addr);
        let m = self.code.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }
}

struct Process {
    space: Option<Arc<AddressSpace>>,
    /// When its maps were last read (or tried), for `MIN_REREAD_INTERVAL`.
    last_read: Instant,
    /// Reads of its maps so far (see `EARLY_REREADS`).
    reads: u32,
    /// For processes whose mappings the kernel reports as they happen (see `map`): the
    /// executable mappings so far. `space` is rebuilt from them when `stale`.
    reported: Option<Vec<MapEntry>>,
    stale: bool,
}

impl Process {
    fn new(space: Option<Arc<AddressSpace>>) -> Self {
        Self {
            space,
            last_read: Instant::now(),
            reads: 0,
            reported: None,
            stale: false,
        }
    }
}

/// An executable mapping reported by the kernel (perf MMAP2), for [`Unwinder::map`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub dev: (u32, u32),
    pub inode: u64,
    pub path: String,
}

/// Unwinds recorded user stacks of many processes: one framehop unwinder per address space
/// (shared by forked children), one rule cache, and one parsed copy of each object for all.
pub struct Unwinder {
    processes: HashMap<u32, Process>,
    /// Parsed objects by identity; `None` records a file that could not be read or parsed, so
    /// it is not retried for every process that maps it.
    objects: HashMap<ObjectKey, Option<Arc<CodeObject>>>,
    cache: CacheX86_64,
    modules_added: u32,
    /// Processes whose mappings come from kernel reports (`map`), kept across their forks.
    reported: HashSet<u32>,
    spaces_built: u64,
    /// The files behind modules mapped in other mount namespaces (containers), kept open so
    /// that the symbolizer reads the very file the process mapped, through
    /// `/proc/self/fd/N`, even once the process and its mount namespace are gone.
    foreign_files: HashMap<Arc<str>, File>,
}

/// The stack words an unwind read: (offset from sp, the word there, or `None` past the
/// copy). With the same address space, registers and these words, it unwinds the same again
/// (see [`super::StackMemo`]).
pub type Reads = Vec<(u64, Option<u64>)>;

/// The word at `offset` bytes into a stack copy, as the unwinder reads it.
pub fn stack_word(stack: &[u8], offset: u64) -> Option<u64> {
    let start = usize::try_from(offset).ok()?;
    let word = stack.get(start..start.checked_add(8)?)?;
    Some(u64::from_le_bytes(word.try_into().ok()?))
}

/// An unwound stack and, when the walk was complete, the address space it was unwound in.
pub struct Unwound {
    pub frames: Vec<RawFrame>,
    pub space: Option<u64>,
}

impl Default for Unwinder {
    fn default() -> Self {
        Self::new()
    }
}

impl Unwinder {
    pub fn new() -> Self {
        Self {
            processes: HashMap::default(),
            objects: HashMap::default(),
            cache: CacheX86_64::new(),
            modules_added: 0,
            reported: HashSet::default(),
            spaces_built: 0,
            foreign_files: HashMap::default(),
        }
    }

    /// A path the symbolizer can open `module` by, for modules of processes in other mount
    /// namespaces (see `module_name`); `None` for every other module, whose path is its name.
    pub fn open_path(&self, module: &str) -> Option<String> {
        let file = self.foreign_files.get(module)?;
        Some(format!("/proc/self/fd/{}", file.as_raw_fd()))
    }

    /// The id of `pid`'s current address space (see [`Unwound::space`]).
    pub fn space_id(&mut self, pid: u32) -> Option<u64> {
        self.rebuild_if_stale(pid);
        Some(self.processes.get(&pid)?.space.as_ref()?.id)
    }

    /// (Re)reads `/proc/PID/maps`; called at attach and after exec.
    pub fn refresh(&mut self, pid: u32) -> anyhow::Result<()> {
        let now = Instant::now();
        let result = self.read_address_space(pid);
        let (previous, reads) = self
            .processes
            .remove(&pid)
            .map_or((None, 0), |p| (p.space, p.reads));
        let (space, outcome) = match result {
            Ok(space) => (Some(space), Ok(())),
            // Keep what we had: events already queued may still unwind with it.
            Err(e) => (previous, Err(e)),
        };
        let mut process = Process::new(space);
        process.last_read = now;
        process.reads = reads + 1;
        // A process fed by mapping reports continues from what /proc says now.
        if let Some(space) = &process.space
            && self.reported.contains(&pid)
        {
            process.reported = Some(space.entries.clone());
        }
        self.processes.insert(pid, process);
        outcome
    }

    /// Records that `pid` mapped executable code. Processes started by fdtrace are followed
    /// this way: they may exit before /proc/PID/maps can be read.
    pub fn map(&mut self, pid: u32, m: &Mapping) {
        self.reported.insert(pid);
        let process = self
            .processes
            .entry(pid)
            .or_insert_with(|| Process::new(None));
        let entries = process.reported.get_or_insert_with(|| {
            process
                .space
                .as_ref()
                .map(|s| s.entries.clone())
                .unwrap_or_default()
        });
        // A new mapping replaces whatever it overlaps, as mmap does.
        entries.retain(|e| e.end <= m.start || e.start >= m.end);
        let path = m.path.strip_suffix(" (deleted)").unwrap_or(&m.path);
        entries.push(MapEntry {
            start: m.start,
            end: m.end,
            exec: true,
            offset: m.offset,
            dev: libc::makedev(m.dev.0, m.dev.1),
            inode: m.inode,
            path: (!path.is_empty()).then(|| Arc::from(path)),
            deleted: path.len() != m.path.len(),
        });
        entries.sort_by_key(|e| e.start);
        process.stale = true;
    }

    /// `pid` replaced its program: the mappings reported from now on are the new image's.
    pub fn exec_reported(&mut self, pid: u32) {
        self.reported.insert(pid);
        let process = self
            .processes
            .entry(pid)
            .or_insert_with(|| Process::new(None));
        process.reported = Some(Vec::new());
        process.space = None;
        process.stale = true;
    }

    /// Whether `pid`'s mappings come from reports rather than /proc.
    pub fn is_reported(&self, pid: u32) -> bool {
        self.reported.contains(&pid)
    }

    /// Rebuilds the address space of a reported process after new mappings.
    fn rebuild_if_stale(&mut self, pid: u32) {
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if !process.stale {
            return;
        }
        process.stale = false;
        let entries = process.reported.clone().unwrap_or_default();
        let space = self.build_space(pid, entries);
        if let Some(process) = self.processes.get_mut(&pid) {
            process.space = Some(space);
        }
    }

    /// A forked child has the parent's mappings (until it execs): share, do not reread.
    pub fn fork(&mut self, parent: u32, child: u32) {
        self.rebuild_if_stale(parent);
        let Some(parent_process) = self.processes.get(&parent) else {
            return;
        };
        let mut process = Process::new(parent_process.space.clone());
        process.reported.clone_from(&parent_process.reported);
        if process.reported.is_some() {
            self.reported.insert(child);
        }
        self.processes.insert(child, process);
    }

    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.reported.remove(&pid);
    }

    /// Unwinds from the registers and the stack copy (`stack` holds the bytes at `sp..`).
    ///
    /// The first frame is `ip` itself. The next ones are call sites: their `addr` is the
    /// return address minus one (inside the call instruction, so that symbolization names the
    /// caller's line even when the call is the last instruction of a function), and
    /// `file_offset` is that address's offset in the object's file.
    ///
    /// Frames in anonymous executable memory (JIT code) have no module; their `file_offset`
    /// is the offset from the start of that mapping. The walk stops at a return address
    /// outside every executable mapping (after rereading the maps once, rate-limited, in
    /// case a library was loaded since), at the end of the copy, after 128 frames, or when
    /// the unwinder fails; it returns the frames found until then.
    pub fn unwind(&mut self, pid: u32, ip: u64, sp: u64, bp: u64, stack: &[u8]) -> Vec<RawFrame> {
        self.unwind_reading(pid, ip, sp, bp, stack, None).frames
    }

    /// [`Unwinder::unwind`], also noting in `reads` every stack word the walk read.
    pub fn unwind_reading(
        &mut self,
        pid: u32,
        ip: u64,
        sp: u64,
        bp: u64,
        stack: &[u8],
        mut reads: Option<&mut Reads>,
    ) -> Unwound {
        self.rebuild_if_stale(pid);
        let mut frames = Vec::with_capacity(32);
        // A process never read (one we missed at attach) counts as all addresses unknown.
        let mut complete = self.walk(pid, (ip, sp, bp), stack, &mut frames, reads.as_deref_mut());
        if !complete && self.reread_if_due(pid) {
            frames.clear();
            if let Some(reads) = reads.as_deref_mut() {
                reads.clear();
            }
            complete = self.walk(pid, (ip, sp, bp), stack, &mut frames, reads);
        }
        let space = complete
            .then(|| Some(self.processes.get(&pid)?.space.as_ref()?.id))
            .flatten();
        Unwound { frames, space }
    }

    /// Unwinds from `(ip, sp, bp)` into `frames`; returns false when an address was outside
    /// the known mappings.
    fn walk(
        &mut self,
        pid: u32,
        (ip, sp, bp): (u64, u64, u64),
        stack: &[u8],
        frames: &mut Vec<RawFrame>,
        mut reads: Option<&mut Reads>,
    ) -> bool {
        let Some(space) = self.processes.get(&pid).and_then(|p| p.space.as_deref()) else {
            frames.push(RawFrame {
                module: None,
                file_offset: ip,
                addr: ip,
            });
            return false;
        };
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let offset = addr.wrapping_sub(sp);
            let word = if addr < sp {
                None
            } else {
                stack_word(stack, offset)
            };
            if let Some(reads) = reads.as_deref_mut() {
                reads.push((offset, word));
            }
            word.ok_or(())
        };
        let regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut iter = space
            .unwinder
            .iter_frames(ip, regs, &mut self.cache, &mut read_stack);
        let mut complete = true;
        while frames.len() < MAX_FRAMES {
            // Err is the normal end too when framehop cannot prove it reached the root.
            let Ok(Some(address)) = iter.next() else {
                break;
            };
            let addr = address.address_for_lookup();
            match space.code_mapping(addr) {
                Some(m) => frames.push(RawFrame {
                    module: m.module.clone(),
                    file_offset: addr - m.start + m.offset,
                    addr,
                }),
                None if !address.is_return_address() => {
                    complete = false;
                    frames.push(RawFrame {
                        module: None,
                        file_offset: addr,
                        addr,
                    });
                }
                // A return address into data or nowhere: either garbage from a frame
                // without unwind info, or code mapped since we read the maps.
                None => return false,
            }
        }
        complete
    }

    /// Rereads the maps unless that was done less than `MIN_REREAD_INTERVAL` ago. Returns
    /// whether the executable mappings changed.
    fn reread_if_due(&mut self, pid: u32) -> bool {
        let due = self.processes.get(&pid).is_none_or(|p| {
            p.reads < EARLY_REREADS || p.last_read.elapsed() >= MIN_REREAD_INTERVAL
        });
        if !due {
            return false;
        }
        let before = self.processes.get(&pid).and_then(|p| p.space.clone());
        if self.refresh(pid).is_err() {
            return false;
        }
        let after = self.processes.get(&pid).and_then(|p| p.space.clone());
        match (before, after) {
            (Some(before), Some(after)) => !Arc::ptr_eq(&before, &after),
            (_, after) => after.is_some(),
        }
    }

    fn read_address_space(&mut self, pid: u32) -> anyhow::Result<Arc<AddressSpace>> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .with_context(|| format!("reading /proc/{pid}/maps"))?;
        let entries: Vec<MapEntry> = parse_maps(&text).into_iter().filter(|m| m.exec).collect();

        // Unchanged: keep the old space, and with it framehop's generation and cached rules.
        if let Some(space) = self.processes.get(&pid).and_then(|p| p.space.as_ref())
            && space.entries == entries
        {
            return Ok(Arc::clone(space));
        }
        Ok(self.build_space(pid, entries))
    }

    /// An address space for these executable mappings, objects parsed once and shared.
    fn build_space(&mut self, pid: u32, entries: Vec<MapEntry>) -> Arc<AddressSpace> {
        if self.objects.len() > MAX_CACHED_OBJECTS {
            self.objects
                .retain(|_, object| object.as_ref().is_some_and(|o| Arc::strong_count(o) > 1));
        }

        if self.foreign_files.len() > MAX_FOREIGN_FILES {
            self.foreign_files.clear();
        }
        let foreign = in_foreign_mount_namespace(pid);
        let mut code = Vec::with_capacity(entries.len());
        let mut unwinder = UnwinderX86_64::new();
        let mut objects = Vec::new();
        for entry in &entries {
            let module = module_name(entry, foreign);
            if foreign
                && let Some(module) = &module
                && !entry.deleted
                && !self.foreign_files.contains_key(module)
                && let Ok(file) = open_mapped_file(pid, entry, foreign)
            {
                self.foreign_files.insert(Arc::clone(module), file);
            }
            if let Some(object) = self.object_for(pid, entry, foreign) {
                if object.has_unwind_info() {
                    unwinder.add_module(Module::new(
                        module.as_deref().unwrap_or_default().to_owned(),
                        entry.start..entry.end,
                        object.load_bias(entry.start, entry.offset),
                        object.section_info(),
                    ));
                    self.modules_added += 1;
                }
                objects.push(object);
            }
            code.push(CodeMapping {
                start: entry.start,
                end: entry.end,
                offset: entry.offset,
                module,
            });
        }
        if self.modules_added > MODULES_PER_CACHE {
            self.cache = CacheX86_64::new();
            self.modules_added = 0;
        }
        self.spaces_built += 1;
        Arc::new(AddressSpace {
            id: self.spaces_built,
            entries,
            code,
            unwinder,
            _objects: objects,
        })
    }

    /// The parsed object behind an executable mapping, from the cache or read now.
    fn object_for(&mut self, pid: u32, entry: &MapEntry, foreign: bool) -> Option<Arc<CodeObject>> {
        let path = entry.path.as_ref()?;
        let is_vdso = &**path == VDSO;
        if !entry.is_file() && !is_vdso {
            return None;
        }
        let key = ObjectKey {
            path: Arc::clone(path),
            dev: entry.dev,
            inode: entry.inode,
        };
        self.objects
            .entry(key)
            .or_insert_with(|| {
                let object = if is_vdso {
                    read_vdso(pid, entry)
                } else {
                    open_mapped_file(pid, entry, foreign)
                        .and_then(|file| CodeObject::read_file(&file))
                };
                object
                    .inspect_err(|e| log::debug!("no unwind info for {path} (pid {pid}): {e:#}"))
                    .ok()
                    .map(Arc::new)
            })
            .clone()
    }
}

/// `RawFrame::module` for an executable mapping: the path as the process sees it. An unlinked
/// file keeps the kernel's ` (deleted)` marker: the path may name a different file by now,
/// and symbolizing against that would give wrong names. A file of a process in another mount
/// namespace (a container) is named by its path there plus its identity (see
/// [`super::namespaced_module`]): two containers may hold different files at the same path.
fn module_name(entry: &MapEntry, foreign: bool) -> Option<Arc<str>> {
    let path = entry.path.as_ref()?;
    if entry.deleted {
        Some(Arc::from(format!("{path} (deleted)")))
    } else if entry.is_file() && foreign {
        Some(super::namespaced_module(path, entry.dev, entry.inode))
    } else if entry.is_file() || &**path == VDSO {
        Some(Arc::clone(path))
    } else {
        // [anon:...] names and the like: JIT code or stubs, not an object.
        None
    }
}

/// Whether `pid` sees another file system tree than we do (it runs in a container). False
/// when that cannot be read: the process is gone, and its files are looked up as ours.
fn in_foreign_mount_namespace(pid: u32) -> bool {
    let mnt = |p: &str| crate::procfs::namespace(p, "mnt");
    match (mnt(&pid.to_string()), mnt("self")) {
        (Some(theirs), Some(ours)) => theirs != ours,
        _ => false,
    }
}

/// Opens the file behind a mapping: through the process's root first (it may live in another
/// mount namespace), then through `map_files` (works for unlinked files; needs `CAP_SYS_ADMIN`),
/// then by the path as we see it. For a process in another mount namespace (`foreign`), only
/// if that is the same file (same device and inode): in a container the same path is often
/// another file, whose unwind tables would be wrong. Not for others: a process gone before
/// its files were opened is taken to be ours, and on 9p (the kernel matrix's guests) a file's
/// identity in a mapping report did not match its stat.
fn open_mapped_file(pid: u32, entry: &MapEntry, foreign: bool) -> anyhow::Result<File> {
    use std::os::unix::fs::MetadataExt as _;
    let path = entry.path.as_deref().unwrap_or_default();
    let map_files = format!("/proc/{pid}/map_files/{:x}-{:x}", entry.start, entry.end);
    let candidates = if entry.deleted {
        vec![map_files]
    } else {
        vec![format!("/proc/{pid}/root{path}"), map_files]
    };
    let mut last_error = None;
    for candidate in candidates {
        match File::open(&candidate) {
            Ok(file) => return Ok(file),
            Err(e) => last_error = Some(anyhow::Error::new(e).context(candidate)),
        }
    }
    if !entry.deleted {
        let file = File::open(path).with_context(|| path.to_owned())?;
        let meta = file.metadata()?;
        if !foreign || (meta.dev(), meta.ino()) == (entry.dev, entry.inode) {
            return Ok(file);
        }
        anyhow::bail!("{path} is another file here than in process {pid}");
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no way to open {path}")))
}

/// The vDSO has no file: read its image from the process's memory.
fn read_vdso(pid: u32, entry: &MapEntry) -> anyhow::Result<CodeObject> {
    let mut mem = File::open(format!("/proc/{pid}/mem")).context("opening /proc/PID/mem")?;
    mem.seek(SeekFrom::Start(entry.start))?;
    let len = usize::try_from(entry.end - entry.start)?;
    let mut image = vec![0; len];
    mem.read_exact(&mut image).context("reading the vDSO")?;
    CodeObject::parse_bytes(&image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_vdso_from_memory() {
        let mut unwinder = Unwinder::new();
        unwinder.refresh(std::process::id()).unwrap();
        let vdso = unwinder
            .objects
            .iter()
            .find(|(key, _)| &*key.path == VDSO)
            .and_then(|(_, object)| object.as_ref())
            .expect("the vDSO was read");
        assert!(vdso.has_unwind_info());
    }

    #[test]
    fn rereads_maps_for_a_library_loaded_since() {
        let pid = std::process::id();
        let mut unwinder = Unwinder::new();
        unwinder.refresh(pid).unwrap();

        // SAFETY: loading zlib runs no code of ours; the symbol is only used as a number.
        let zlib_version = unsafe {
            let handle = libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_NOW);
            assert!(!handle.is_null(), "zlib1g is part of every Debian system");
            libc::dlsym(handle, c"zlibVersion".as_ptr()) as u64
        };
        std::thread::sleep(MIN_REREAD_INTERVAL + Duration::from_millis(10));

        let frames = unwinder.unwind(pid, zlib_version, 0, 0, &[]);
        assert_eq!(frames.len(), 1);
        let module = frames[0].module.as_deref().unwrap();
        assert!(module.contains("libz.so"), "{module}");
    }
}
