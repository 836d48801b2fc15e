//! A process's descriptor table, indexed by descriptor number.
//!
//! The kernel hands out the lowest free number, so a table is dense from 0: slots in fixed
//! chunks cost 24 bytes a descriptor where a `BTreeMap` cost about 90 with its half-full nodes
//! (1M descriptors are 24 MB, not 90). A chunk is allocated on its first descriptor and freed
//! with its last, so one `dup2(fd, 999_999)` costs one chunk and a pointer per skipped chunk.

use super::OpenFd;

const CHUNK: usize = 256;

#[derive(Clone, Debug)]
struct Chunk {
    slots: [Option<OpenFd>; CHUNK],
    used: usize,
}

#[derive(Clone, Debug, Default)]
pub struct FdMap {
    chunks: Vec<Option<Box<Chunk>>>,
    len: usize,
}

/// (chunk, slot) of a descriptor number; None for negative numbers, which name nothing.
fn place(fd: i32) -> Option<(usize, usize)> {
    let n = usize::try_from(fd).ok()?;
    Some((n / CHUNK, n % CHUNK))
}

impl FdMap {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, fd: i32) -> Option<&OpenFd> {
        let (c, s) = place(fd)?;
        self.chunks.get(c)?.as_ref()?.slots[s].as_ref()
    }

    pub fn get_mut(&mut self, fd: i32) -> Option<&mut OpenFd> {
        let (c, s) = place(fd)?;
        self.chunks.get_mut(c)?.as_mut()?.slots[s].as_mut()
    }

    /// Puts `open` at `fd`; returns what was there. Negative numbers are refused (None).
    pub fn insert(&mut self, fd: i32, open: OpenFd) -> Option<OpenFd> {
        let (c, s) = place(fd)?;
        if self.chunks.len() <= c {
            self.chunks.resize_with(c + 1, || None);
        }
        let chunk = self.chunks[c].get_or_insert_with(|| {
            Box::new(Chunk {
                slots: std::array::from_fn(|_| None),
                used: 0,
            })
        });
        let old = chunk.slots[s].replace(open);
        if old.is_none() {
            chunk.used += 1;
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, fd: i32) -> Option<OpenFd> {
        let (c, s) = place(fd)?;
        let chunk = self.chunks.get_mut(c)?.as_mut()?;
        let old = chunk.slots[s].take()?;
        chunk.used -= 1;
        self.len -= 1;
        if chunk.used == 0 {
            self.chunks[c] = None;
            while self.chunks.last().is_some_and(Option::is_none) {
                self.chunks.pop();
            }
        }
        Some(old)
    }

    /// Open descriptors in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &OpenFd)> {
        self.range(0, i32::MAX)
    }

    pub fn keys(&self) -> impl Iterator<Item = i32> + '_ {
        self.iter().map(|(n, _)| n)
    }

    pub fn values(&self) -> impl Iterator<Item = &OpenFd> {
        self.iter().map(|(_, f)| f)
    }

    /// Open descriptors numbered `first..=last`, ascending.
    pub fn range(&self, first: i32, last: i32) -> impl Iterator<Item = (i32, &OpenFd)> {
        let (lo, hi) = bounds(first, last, self.chunks.len());
        self.chunks[lo..hi]
            .iter()
            .enumerate()
            .filter_map(move |(i, c)| Some((lo + i, c.as_ref()?)))
            .flat_map(|(c, chunk)| {
                chunk
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(move |(s, f)| Some((number(c, s), f.as_ref()?)))
            })
            .filter(move |&(n, _)| n >= first && n <= last)
    }

    /// Like [`FdMap::range`], mutable.
    pub fn range_mut(&mut self, first: i32, last: i32) -> impl Iterator<Item = &mut OpenFd> {
        let (lo, hi) = bounds(first, last, self.chunks.len());
        self.chunks[lo..hi]
            .iter_mut()
            .enumerate()
            .filter_map(move |(i, c)| Some((lo + i, c.as_mut()?)))
            .flat_map(|(c, chunk)| {
                chunk
                    .slots
                    .iter_mut()
                    .enumerate()
                    .filter_map(move |(s, f)| Some((number(c, s), f.as_mut()?)))
            })
            .filter(move |(n, _)| *n >= first && *n <= last)
            .map(|(_, f)| f)
    }
}

/// The chunks holding numbers `first..=last`, clamped to `len` chunks (empty when none).
fn bounds(first: i32, last: i32, len: usize) -> (usize, usize) {
    let lo = usize::try_from(first.max(0)).unwrap_or(0) / CHUNK;
    let hi = usize::try_from(last).map_or(0, |l| l / CHUNK + 1);
    let hi = hi.min(len);
    (lo.min(hi), hi)
}

fn number(chunk: usize, slot: usize) -> i32 {
    i32::try_from(chunk * CHUNK + slot).unwrap_or(i32::MAX)
}

impl PartialEq for FdMap {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for FdMap {}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::FdKind;

    fn open(site: u32) -> OpenFd {
        OpenFd {
            kind: FdKind::File,
            target: arcstr::literal!("/x"),
            site,
            opened_ns: u64::from(site),
            cloexec: false,
        }
    }

    /// Against a BTreeMap doing the same inserts and removes, over numbers that cross chunk
    /// boundaries, leave holes and empty whole chunks.
    #[test]
    fn behaves_like_an_ordered_map() {
        let mut map = FdMap::default();
        let mut want = BTreeMap::new();
        let mut x: u32 = 7;
        for step in 0..20_000u32 {
            // A small LCG: deterministic, spread over 0..1200.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let fd = i32::try_from((x >> 8) % 1200).unwrap();
            if step % 3 == 0 {
                assert_eq!(map.remove(fd), want.remove(&fd), "remove {fd}");
            } else {
                assert_eq!(map.insert(fd, open(step)), want.insert(fd, open(step)));
            }
            assert_eq!(map.len(), want.len());
        }
        let all: Vec<(i32, OpenFd)> = map.iter().map(|(n, f)| (n, f.clone())).collect();
        let expected: Vec<(i32, OpenFd)> = want.iter().map(|(n, f)| (*n, f.clone())).collect();
        assert_eq!(all, expected);
        for (first, last) in [(0, 0), (250, 260), (255, 256), (1000, i32::MAX), (5, 3)] {
            let got: Vec<i32> = map.range(first, last).map(|(n, _)| n).collect();
            let expected: Vec<i32> = if first <= last {
                want.range(first..=last).map(|(n, _)| *n).collect()
            } else {
                Vec::new()
            };
            assert_eq!(got, expected, "range {first}..={last}");
        }
        for f in map.range_mut(300, 599) {
            f.cloexec = true;
        }
        let marked: Vec<i32> = map
            .iter()
            .filter(|(_, f)| f.cloexec)
            .map(|(n, _)| n)
            .collect();
        let expected: Vec<i32> = want.range(300..=599).map(|(n, _)| *n).collect();
        assert_eq!(marked, expected);
    }

    #[test]
    fn empty_chunks_are_freed_and_negative_numbers_refused() {
        let mut map = FdMap::default();
        assert_eq!(map.insert(-1, open(1)), None);
        assert!(map.is_empty());
        map.insert(1_000_000, open(2));
        assert_eq!(map.keys().collect::<Vec<_>>(), [1_000_000]);
        assert!(map.remove(1_000_000).is_some());
        assert!(map.chunks.is_empty());
        assert_eq!(map.get(1_000_000), None);
    }
}
