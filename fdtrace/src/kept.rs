//! Userspace's side of the descriptors kept in the kernel (`fdtrace-ebpf/src/kept.rs`).
//!
//! The probe keeps a creation instead of sending it when a memo installed here recognizes its
//! call site, and counts its close as a pair of that site. What userspace does in return:
//! - installs a memo for every native stack it unwinds (the words the unwind read, less those
//!   shown not to matter), and drops a process's memos when its address space changes;
//! - takes kept descriptors out of the map, each exactly once, and turns them into the
//!   creation records they stand for: those older than [`AGE_NS`] on its tick (so the views
//!   see what stays open), and all of a process's at the moments that need its whole table
//!   (its fork, exec, exit, an EMFILE, a /proc listing, close_range);
//! - reads the pairs counted in the kernel, as differences since its last read.

use std::{
    mem::MaybeUninit,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{HashMap, IterableMap as _, MapData};
use bytes::Bytes;
use fdtrace_common::{
    Kept, LIFETIME_BUCKETS, Memo, MemoKey, PairKey, Pairs, RecordHeader, kind,
    lifetime_bucket_middle,
};
use foldhash::HashMap as FastMap;

use crate::decode::{Record, StackCapture};

/// A kept descriptor this old is taken on the tick: it is no longer a balanced one, and the
/// views must show it. (Shorter-lived ones are only counts and lifetimes.)
pub const AGE_NS: u64 = 1_000_000_000;

/// A call site's pairs counted in the kernel since the last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPairs {
    pub pid: u32,
    pub stack: u32,
    pub syscall: u32,
    pub count: u64,
    /// (lifetime in microseconds, the middle of its bucket; how many).
    pub lifetimes: Vec<(u64, u32)>,
}

pub struct KeptMaps {
    memos: HashMap<MapData, MemoKey, Memo>,
    kept: HashMap<MapData, u64, Kept>,
    pairs: HashMap<MapData, PairKey, Pairs>,
    holds: HashMap<MapData, u32, u64>,
    /// Whether the probe keeps anything (`ProbeOptions::keep`).
    on: bool,
    installed: FastMap<u32, FastMap<MemoKey, Memo>>,
    pairs_seen: FastMap<PairKey, Pairs>,
}

impl KeptMaps {
    pub fn new(
        memos: HashMap<MapData, MemoKey, Memo>,
        kept: HashMap<MapData, u64, Kept>,
        pairs: HashMap<MapData, PairKey, Pairs>,
        holds: HashMap<MapData, u32, u64>,
        on: bool,
    ) -> Self {
        Self {
            memos,
            kept,
            pairs,
            holds,
            on,
            installed: FastMap::default(),
            pairs_seen: FastMap::default(),
        }
    }

    /// Lets the probe recognize a call site (a full map only means more records). The
    /// records of a batch decoded before the first unwind all unwind alike: one insert.
    pub fn install(&mut self, key: MemoKey, memo: &Memo) {
        if !self.on {
            return;
        }
        let installed = self.installed.entry(key.tgid).or_default();
        if installed.get(&key) == Some(memo) {
            return;
        }
        if self.memos.insert(key, memo, 0).is_ok() {
            installed.insert(key, *memo);
        }
    }

    /// Drops `pid`'s memos: its address space changed, or it is gone.
    pub fn forget_memos(&mut self, pid: u32) {
        for key in self.installed.remove(&pid).unwrap_or_default().into_keys() {
            let _ = self.memos.remove(&key);
        }
    }

    /// Takes `pid`'s kept descriptors (every process's with `None`) created before `before`
    /// out of the map, oldest first, as the creation records they stand for.
    pub fn take(&mut self, pid: Option<u32>, before: u64) -> Vec<Record> {
        if !self.on {
            return Vec::new();
        }
        let keys: Vec<u64> = self.kept.keys().filter_map(Result::ok).collect();
        let mut taken = Vec::new();
        for key in keys {
            if pid.is_some_and(|pid| (key >> 32) as u32 != pid) {
                continue;
            }
            // One in a close is left to that close's return, which removes it (its look
            // then delete is safe only so), except at the process's exit, which no close
            // outlives.
            let due = |k: Kept| k.ts_ns < before && (k.closing == 0 || before == u64::MAX);
            if !self.kept.get(&key, 0).is_ok_and(due) {
                continue;
            }
            // The probe may close it, or close it and create another at the number, between
            // the look above and here: the entry taken is whatever the delete removed.
            if let Some(kept) = lookup_and_delete(self.kept.map(), key) {
                taken.push(record((key >> 32) as u32, key as u32, &kept));
            }
        }
        taken.sort_by_key(|rec| rec.header.ts_ns);
        taken
    }

    /// Holds `pid`'s kept descriptors created before `ts` for a /proc listing taken now.
    pub fn hold(&mut self, pid: u32, ts: u64) {
        if self.on {
            let _ = self.holds.insert(pid, ts, 0);
        }
    }

    /// Ends `pid`'s hold if it began by `upto` (a later one stays for its own moment).
    pub fn release(&mut self, pid: u32, upto: u64) {
        if self.on && self.holds.get(&pid, 0).is_ok_and(|since| since <= upto) {
            let _ = self.holds.remove(&pid);
        }
    }

    /// Processes under a hold, and since when.
    pub fn holds(&self) -> Vec<(u32, u64)> {
        if !self.on {
            return Vec::new();
        }
        self.holds.iter().filter_map(Result::ok).collect()
    }

    /// Pairs counted in the kernel since the last call.
    pub fn new_pairs(&mut self) -> Vec<NewPairs> {
        if !self.on {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (key, now) in self.pairs.iter().filter_map(Result::ok) {
            let seen = self.pairs_seen.entry(key).or_insert(Pairs {
                count: 0,
                buckets: [0; LIFETIME_BUCKETS],
            });
            let count = now.count.wrapping_sub(seen.count);
            if count == 0 {
                continue;
            }
            let lifetimes = (0..LIFETIME_BUCKETS)
                .filter_map(|b| {
                    let n = now.buckets[b].wrapping_sub(seen.buckets[b]);
                    (n > 0).then(|| (lifetime_bucket_middle(b), n))
                })
                .collect();
            *seen = now;
            out.push(NewPairs {
                pid: key.tgid,
                stack: key.site,
                syscall: key.nr,
                count,
                lifetimes,
            });
        }
        out
    }

    /// Forgets everything of `pid`, which exited; call after the last [`Self::new_pairs`]
    /// and [`Self::take`] for it (nothing adds to its entries any more).
    pub fn forget_process(&mut self, pid: u32) {
        if !self.on {
            return;
        }
        self.forget_memos(pid);
        let keys: Vec<PairKey> = self
            .pairs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for key in keys {
            let _ = self.pairs.remove(&key);
            self.pairs_seen.remove(&key);
        }
        let _ = self.holds.remove(&pid);
    }
}

/// The creation record a kept descriptor stands for.
fn record(tgid: u32, fd: u32, kept: &Kept) -> Record {
    use fdtrace_common::syscalls as sc;
    let mut aux_len = (kept.aux_len as usize).min(kept.aux.len());
    let mut aux = Bytes::new();
    if matches!(kept.nr, sc::OPEN | sc::OPENAT | sc::OPENAT2 | sc::CREAT) {
        // The probe copies a path's whole area: the path ends at its NUL. One longer than
        // the area is read from /proc while the descriptor is open, and marked cut if not.
        if let Some(end) = kept.aux[..aux_len].iter().position(|&b| b == 0) {
            aux_len = end;
        } else {
            let link = std::fs::read_link(format!("/proc/{tgid}/fd/{fd}"));
            let mut path = match link {
                Ok(path) => path.into_os_string().into_encoded_bytes(),
                Err(_) => [&kept.aux[..aux_len], "…".as_bytes()].concat(),
            };
            path.truncate(fdtrace_common::AUX_MAX);
            aux = Bytes::from(path);
        }
    }
    if aux.is_empty() {
        aux = Bytes::copy_from_slice(&kept.aux[..aux_len]);
    }
    Record {
        header: RecordHeader {
            kind: kind::STACKED,
            nr: kept.nr,
            tgid,
            tid: kept.tid,
            ts_ns: kept.ts_ns,
            ret: i64::from(fd),
            args: kept.args,
        },
        stack: Some(StackCapture {
            known: Some(kept.site),
            ..StackCapture::default()
        }),
        aux,
        py: Vec::new(),
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (hash maps since Linux 5.14), which aya keeps to itself:
/// the value and its removal in one step, so that an entry the probe replaced meanwhile is
/// never removed under another's value.
fn lookup_and_delete(map: &MapData, key: u64) -> Option<Kept> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = MaybeUninit::<Kept>::uninit();
    let attr = Attr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        pad: 0,
        key: (&raw const key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the attribute points at a key and a value buffer of the map's sizes, which
    // outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw const attr,
            size_of::<Attr>(),
        )
    };
    // SAFETY: the kernel filled the value on success.
    (r == 0).then(|| unsafe { value.assume_init() })
}

#[cfg(test)]
mod tests {
    use fdtrace_common::{KEPT_AUX, syscalls as sc};

    use super::*;

    fn kept(nr: u32, aux: &[u8], aux_len: u32) -> Kept {
        let mut k = Kept {
            ts_ns: 5,
            closing: 0,
            args: [1, 2, 3, 4, 5, 6],
            tid: 8,
            nr,
            site: 42,
            aux_len,
            aux: [0xaa; KEPT_AUX],
        };
        k.aux[..aux.len()].copy_from_slice(aux);
        k
    }

    #[test]
    fn a_kept_descriptor_is_the_record_it_stands_for() {
        let rec = record(7, 9, &kept(sc::OPENAT, b"/etc/hostname\0", KEPT_AUX as u32));
        assert_eq!(&rec.aux[..], b"/etc/hostname");
        assert_eq!((rec.header.tgid, rec.header.tid, rec.header.ret), (7, 8, 9));
        assert_eq!(
            (rec.header.nr, rec.header.ts_ns, rec.header.kind),
            (sc::OPENAT, 5, kind::STACKED)
        );
        assert_eq!(rec.stack.as_ref().and_then(|s| s.known), Some(42));
        // A peer address keeps its zero bytes, and a path without a NUL is cut at the area.
        let peer = [2, 0, 0x1f, 0x90, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        let rec = record(7, 9, &kept(sc::ACCEPT4, &peer, 16));
        assert_eq!(&rec.aux[..], &peer);
        // (pid 7 is no process of ours: the /proc fallback finds nothing.)
        let rec = record(7, 9, &kept(sc::OPEN, &[b'a'; KEPT_AUX], KEPT_AUX as u32));
        assert_eq!(
            &rec.aux[..],
            [&[b'a'; KEPT_AUX][..], "…".as_bytes()].concat()
        );
    }
}
