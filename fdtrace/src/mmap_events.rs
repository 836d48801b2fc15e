//! Executable mappings of launched processes, from perf MMAP2 records.
//!
//! Unwinding needs each process's module map at the moment of every stack. For a long-running
//! process /proc/PID/maps is there to read; a command started by `fdtrace run` may map its
//! libraries, leak and exit within a millisecond, before userspace gets to /proc. A software
//! perf event with `mmap2` and `inherit` on the launched process makes the kernel report every
//! executable mapping of it and of every child it forks, with CLOCK_MONOTONIC times that merge
//! with the probes' records. This is how perf itself follows short-lived processes.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::stack::Mapping;

/// What the kernel reported about a watched process's address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapEvent {
    /// It mapped executable code.
    Map { pid: u32, ts: u64, mapping: Mapping },
    /// It began executing a new program: its old mappings are gone. Reported before the new
    /// program's own mappings (perf's COMM record with the exec flag, from begin_new_exec).
    Exec { pid: u32, ts: u64 },
}

impl MapEvent {
    pub fn ts(&self) -> u64 {
        match self {
            MapEvent::Map { ts, .. } | MapEvent::Exec { ts, .. } => *ts,
        }
    }
}

/// `struct perf_event_attr` up to PERF_ATTR_SIZE_VER5 (include/uapi/linux/perf_event.h).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}
const _: () = assert!(size_of::<PerfEventAttr>() == 112);

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_DUMMY: u64 = 9;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_TIME: u64 = 1 << 2;
// Bits of the flags word.
const INHERIT: u64 = 1 << 1;
const EXCLUDE_KERNEL: u64 = 1 << 5;
const EXCLUDE_HV: u64 = 1 << 6;
const MMAP: u64 = 1 << 8;
const COMM: u64 = 1 << 9;
const COMM_EXEC: u64 = 1 << 24;
const SAMPLE_ID_ALL: u64 = 1 << 18;
const MMAP2: u64 = 1 << 23;
const USE_CLOCKID: u64 = 1 << 25;
/// `wakeup_events` is a byte watermark: with 1, every record wakes a poller.
const WATERMARK: u64 = 1 << 14;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_COMM: u32 = 3;
const MISC_COMM_EXEC: u16 = 1 << 13;
const PERF_RECORD_MMAP2: u32 = 10;
/// PERF_RECORD_MISC_MMAP_BUILD_ID: the record carries a build id instead of device and inode.
const MISC_MMAP_BUILD_ID: u16 = 1 << 14;

/// Data pages per CPU ring (a power of two): 256 KiB holds thousands of mappings.
const DATA_PAGES: usize = 64;

/// One CPU's ring of a watched process tree.
struct PerfRing {
    /// Kept open for the mapping; polled for wakeups.
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
    page: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through &mut self.
unsafe impl Send for PerfRing {}

impl Drop for PerfRing {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Watches the executable mappings of processes and their descendants.
pub struct MmapWatcher {
    rings: Vec<PerfRing>,
    /// Readable once `watch` adds rings, so that a thread polling the old set wakes to poll
    /// the new one at once: a launched CPython maps its interpreter within a millisecond of
    /// its release and runs its first lines 20 ms later.
    wake: Option<OwnedFd>,
    /// Records the kernel dropped because a ring was full.
    pub lost: u64,
}

impl Default for MmapWatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl MmapWatcher {
    pub fn new() -> Self {
        // SAFETY: eventfd has no memory-safety preconditions; a new descriptor is owned here.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        Self {
            rings: Vec::new(),
            // SAFETY: a descriptor eventfd just returned, owned by nothing else.
            wake: (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }),
            lost: 0,
        }
    }

    /// Starts reporting the mappings `pid` (a process that has not started other threads, such
    /// as a launched child held before exec) and everything it forks will make.
    pub fn watch(&mut self, pid: u32) -> io::Result<()> {
        // The kernel refuses to mmap an inherited per-task event that spans all CPUs (perf_mmap
        // in kernel/events/core.c), so there is one event per CPU.
        let cpus = online_cpus()?;
        for cpu in cpus {
            self.rings.push(PerfRing::open(pid, cpu)?);
        }
        if let Some(wake) = &self.wake {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
            unsafe { libc::write(wake.as_raw_fd(), (&raw const one).cast(), 8) };
        }
        Ok(())
    }

    /// The descriptor that `watch` makes readable (see the field), to poll with the rings';
    /// `drain` empties it.
    pub fn wake_fd(&self) -> Option<i32> {
        self.wake.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }

    /// Appends every mapping reported since the last call.
    pub fn drain(&mut self, out: &mut Vec<MapEvent>) {
        if let Some(wake) = &self.wake {
            let mut count = 0u64;
            // SAFETY: reads at most 8 bytes into a live u64; non-blocking.
            unsafe { libc::read(wake.as_raw_fd(), (&raw mut count).cast(), 8) };
        }
        for ring in &mut self.rings {
            ring.drain(out, &mut self.lost);
        }
    }

    /// The rings' descriptors, to poll for new reports.
    pub fn fds(&self) -> Vec<i32> {
        self.rings.iter().map(|r| r.fd.as_raw_fd()).collect()
    }
}

impl PerfRing {
    fn open(pid: u32, cpu: u32) -> io::Result<Self> {
        let attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_DUMMY,
            sample_type: PERF_SAMPLE_TID | PERF_SAMPLE_TIME,
            flags: INHERIT
                | EXCLUDE_KERNEL
                | EXCLUDE_HV
                | MMAP
                | MMAP2
                | COMM
                | COMM_EXEC
                | SAMPLE_ID_ALL
                | USE_CLOCKID
                | WATERMARK,
            // Mappings are few (tens per program start) and a CPython's must reach the probe
            // before its first lines run: wake the mapping thread for each one.
            wakeup_events: 1,
            clockid: libc::CLOCK_MONOTONIC,
            ..PerfEventAttr::default()
        };
        // SAFETY: a valid attr; the returned descriptor is owned below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &raw const attr,
                pid as i32,
                cpu as i32,
                -1,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = page * (1 + DATA_PAGES);
        // SAFETY: mapping the event's ring as the perf ABI prescribes (metadata page + data).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self {
            fd,
            base,
            len,
            page,
        })
    }

    /// `data_head` and `data_tail` of `struct perf_event_mmap_page`, at byte offsets 1024 and 1032.
    fn positions(&self) -> (&AtomicU64, &AtomicU64) {
        let word = |offset: usize| {
            // SAFETY: the metadata page is mapped for our lifetime, page-aligned, so these
            // fields are 8-aligned.
            #[expect(
                clippy::cast_ptr_alignment,
                reason = "page-aligned mapping, 8-aligned offset"
            )]
            unsafe {
                &*self.base.as_ptr().add(offset).cast::<AtomicU64>()
            }
        };
        (word(1024), word(1032))
    }

    fn drain(&mut self, out: &mut Vec<MapEvent>, lost: &mut u64) {
        let (head, tail) = self.positions();
        let head_pos = head.load(Ordering::Acquire);
        let mut pos = tail.load(Ordering::Relaxed);
        let size = (self.len - self.page) as u64;
        // SAFETY: the data area follows the metadata page.
        let data =
            unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(self.page), size as usize) };
        let mut record = Vec::new();
        while pos < head_pos {
            let byte = |p: u64| data[(p % size) as usize];
            let header: Vec<u8> = (0..8).map(|i| byte(pos + i)).collect();
            let kind = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
            let misc = u16::from_ne_bytes([header[4], header[5]]);
            let len = u64::from(u16::from_ne_bytes([header[6], header[7]]));
            if len < 8 {
                break; // corrupt; resynchronise at head
            }
            record.clear();
            record.extend((0..len).map(|i| byte(pos + i)));
            match kind {
                PERF_RECORD_MMAP2 => out.extend(parse_mmap2(&record, misc)),
                PERF_RECORD_COMM if misc & MISC_COMM_EXEC != 0 && record.len() >= 24 => {
                    let pid = u32::from_ne_bytes(record[8..12].try_into().expect("4 bytes"));
                    let ts =
                        u64::from_ne_bytes(record[record.len() - 8..].try_into().expect("8 bytes"));
                    out.push(MapEvent::Exec { pid, ts });
                }
                PERF_RECORD_LOST if record.len() >= 24 => {
                    *lost += u64::from_ne_bytes(record[16..24].try_into().expect("8 bytes"));
                }
                _ => {}
            }
            pos += len;
        }
        tail.store(head_pos, Ordering::Release);
    }
}

/// PERF_RECORD_MMAP2 body: pid, tid, addr, len, pgoff, maj, min, ino, ino_generation, prot,
/// flags, filename (NUL-padded to 8 bytes), then the sample_id trailer: pid, tid, time.
fn parse_mmap2(rec: &[u8], misc: u16) -> Option<MapEvent> {
    let u32_at = |o: usize| {
        rec.get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        rec.get(o..o + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    };
    let pid = u32_at(8)?;
    let start = u64_at(16)?;
    let len = u64_at(24)?;
    let pgoff = u64_at(32)?;
    let (dev, inode) = if misc & MISC_MMAP_BUILD_ID != 0 {
        ((0, 0), 0)
    } else {
        ((u32_at(40)?, u32_at(44)?), u64_at(48)?)
    };
    let name_start = 72;
    let trailer = rec.len().checked_sub(16)?;
    let name = rec.get(name_start..trailer)?;
    let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
    let ts = u64_at(trailer + 8)?;
    Some(MapEvent::Map {
        pid,
        ts,
        mapping: Mapping {
            start,
            end: start + len,
            offset: pgoff,
            dev,
            inode,
            path: String::from_utf8_lossy(name).into_owned(),
        },
    })
}

fn online_cpus() -> io::Result<Vec<u32>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        let parse = |s: &str| {
            s.parse::<u32>()
                .map_err(|e| io::Error::other(format!("cpu list {text:?}: {e}")))
        };
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(parse(a)?..=parse(b)?),
            None => cpus.push(parse(part)?),
        }
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmap2_records_parse() {
        let mut rec = vec![0u8; 8];
        for v in [42u32, 43] {
            rec.extend(v.to_ne_bytes());
        }
        for v in [0x7f00_0000_0000u64, 0x2000, 0x1000] {
            rec.extend(v.to_ne_bytes());
        }
        rec.extend(8u32.to_ne_bytes());
        rec.extend(1u32.to_ne_bytes());
        rec.extend(777u64.to_ne_bytes());
        rec.extend(0u64.to_ne_bytes());
        rec.extend(5u32.to_ne_bytes());
        rec.extend(2u32.to_ne_bytes());
        rec.extend(b"/usr/lib/libc.so.6\0\0\0\0\0\0");
        rec.extend(42u32.to_ne_bytes());
        rec.extend(43u32.to_ne_bytes());
        rec.extend(123_456u64.to_ne_bytes());
        let m = parse_mmap2(&rec, 0).unwrap();
        assert_eq!(
            m,
            MapEvent::Map {
                pid: 42,
                ts: 123_456,
                mapping: Mapping {
                    start: 0x7f00_0000_0000,
                    end: 0x7f00_0000_2000,
                    offset: 0x1000,
                    dev: (8, 1),
                    inode: 777,
                    path: "/usr/lib/libc.so.6".into()
                }
            }
        );
    }

    #[test]
    fn cpu_lists_parse() {
        assert!(!online_cpus().unwrap().is_empty());
    }
}
