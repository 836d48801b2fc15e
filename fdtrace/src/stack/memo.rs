//! Remembers which stack an unwind produced, so that the same call path is not unwound again.
//!
//! A server opens its files from the same few places at the same stack depth: nginx's open
//! of a static file has the same `ip` and `sp` for every request, and unwinding its 12 to 19
//! frames was a third of fdtrace's time under load. An unwind is a function of the address
//! space, the registers and the stack words it reads, so a result is reused when the
//! `(pid, ip, sp)` and the words it read (at their offsets from `sp`) are the same.
//!
//! Some of those inputs are data, though: without frame pointers `bp` holds whatever the
//! code keeps there, and a frame that saved it gives the walk a word that differs every call
//! (nginx: a request pointer, 1184 bytes up). The walk may also depend on them, where a
//! function does keep a frame pointer. So a memo is first tied to all of them; when an unwind
//! with another `bp`, or other values in some words, read at exactly the same offsets and gave
//! the same raw frames (objects and offsets), no address came from those values, and they
//! stop being compared. The same raw frames, not the same call site: two calls from one
//! source line are one site with two return addresses, and taking that word for data gave a
//! third caller reaching the same (ip, sp) the first one's stack.

//!
//! The ring reader consults the memo (shared behind a lock) before copying a record out of the
//! ring: a hit needs only the stack id, not the stack, whose copy was the reader's main cost.
//! A process's memos are dropped when its address space changes (exec, a library mapped),
//! since the same words could then unwind differently.

use fdtrace_common::{MEMO_CHECKS, Memo};
use foldhash::HashMap;

use super::unwind::{Reads, stack_word};

/// More memos than this, and the memo starts over: it serves hot paths.
const MAX_ENTRIES: usize = 65_536;

#[derive(Debug)]
struct Entry {
    bp: u64,
    bp_irrelevant: bool,
    reads: Reads,
    /// Per read: whether its value decides the walk (until shown otherwise).
    decides: Vec<bool>,
    /// The deciding reads by offset: the words are compared in the ring, where each cache
    /// line comes from the CPU the probe ran on, and ascending reads let the prefetcher help.
    checks: Vec<(u64, Option<u64>)>,
    /// What the unwind gave: a digest of its raw frames, and the call site they were interned as.
    raw: u64,
    stack: u32,
}

impl Entry {
    fn new(bp: u64, reads: Reads, raw: u64, stack: u32) -> Self {
        let mut entry = Self {
            bp,
            bp_irrelevant: false,
            decides: vec![true; reads.len()],
            reads,
            checks: Vec::new(),
            raw,
            stack,
        };
        entry.sort_checks();
        entry
    }

    fn sort_checks(&mut self) {
        self.checks = self
            .reads
            .iter()
            .zip(&self.decides)
            .filter(|&(_, &decides)| decides)
            .map(|(&read, _)| read)
            .collect();
        self.checks.sort_unstable_by_key(|&(offset, _)| offset);
        self.checks.dedup();
    }
}

/// One process's memos, all made in one address space.
#[derive(Debug, Default)]
struct ProcessMemo {
    space: u64,
    entries: HashMap<(u64, u64), Entry>,
}

/// Stack ids by the registers and stack words that produced them.
#[derive(Debug, Default)]
pub struct StackMemo {
    processes: HashMap<u32, ProcessMemo>,
    entries: usize,
}

impl StackMemo {
    /// The stack id remembered for this capture of `pid`'s stack (`stack` holds the bytes at
    /// `sp..`), if the same unwind would give it again.
    pub fn get(&self, pid: u32, (ip, sp, bp): (u64, u64, u64), stack: &[u8]) -> Option<u32> {
        let e = self.processes.get(&pid)?.entries.get(&(ip, sp))?;
        let same = (e.bp == bp || e.bp_irrelevant)
            && e.reads
                .iter()
                .zip(&e.decides)
                .all(|(&(offset, word), &decides)| !decides || stack_word(stack, offset) == word);
        same.then_some(e.stack)
    }

    /// Remembers what an unwind of `pid`'s stack in address space `space` read and produced:
    /// raw frames with digest `raw` (see [`raw_digest`]), interned as `stack`.
    pub fn insert(
        &mut self,
        pid: u32,
        (ip, sp, bp): (u64, u64, u64),
        space: u64,
        reads: Reads,
        (raw, stack): (u64, u32),
    ) {
        if self.entries >= MAX_ENTRIES {
            self.processes.clear();
            self.entries = 0;
        }
        let process = self.processes.entry(pid).or_default();
        if process.space != space {
            self.entries -= process.entries.len();
            process.entries.clear();
            process.space = space;
        }
        if let Some(e) = process.entries.get_mut(&(ip, sp))
            && (e.raw, e.stack) == (raw, stack)
            && e.reads.len() == reads.len()
            && e.reads.iter().zip(&reads).all(|(a, b)| a.0 == b.0)
        {
            // The same offsets and the same stack from another bp or other values: those
            // inputs decided nothing.
            e.bp_irrelevant |= e.bp != bp;
            for (decides, (old, new)) in e.decides.iter_mut().zip(e.reads.iter().zip(&reads)) {
                *decides &= old.1 == new.1;
            }
            e.sort_checks();
            return;
        }
        if process
            .entries
            .insert((ip, sp), Entry::new(bp, reads, raw, stack))
            .is_none()
        {
            self.entries += 1;
        }
    }

    /// What the probe compares to recognize this memo itself (see `fdtrace_common::Memo`),
    /// for a capture `span` bytes long; `None` when it needs more checks than the probe has
    /// room for, or reads it cannot make.
    pub fn kernel_memo(&self, pid: u32, (ip, sp): (u64, u64), span: usize) -> Option<Memo> {
        let e = self.processes.get(&pid)?.entries.get(&(ip, sp))?;
        let span = u32::try_from(span).ok()?;
        let mut memo = Memo {
            site: e.stack,
            span,
            bp: e.bp,
            bp_matters: u32::from(!e.bp_irrelevant),
            count: 0,
            reach: 0,
            pad: 0,
            offsets: [0; MEMO_CHECKS],
            words: [0; MEMO_CHECKS],
        };
        // Without a word found past the capture's end, the copy's length does not matter as
        // long as it covers the checks (the clamp to the main thread's stack, learned after
        // the first records, shortens it): span 0 tells the probe so.
        let mut past_end = false;
        for &(offset, word) in &e.checks {
            let end = offset.checked_add(8)?;
            match word {
                // Past the capture's end: past the probe's copy of the same length too.
                None if end > u64::from(span) => past_end = true,
                None => return None,
                Some(word) => {
                    let i = memo.count as usize;
                    if i == MEMO_CHECKS || offset % 8 != 0 || end > u64::from(span) {
                        return None;
                    }
                    memo.offsets[i] = u32::try_from(offset).ok()?;
                    memo.words[i] = word;
                    memo.count += 1;
                    memo.reach = memo.reach.max(u32::try_from(end).ok()?);
                }
            }
        }
        if !past_end {
            memo.span = 0;
        }
        Some(memo)
    }

    /// Drops `pid`'s memos (it exited or exec'd).
    pub fn forget(&mut self, pid: u32) {
        if let Some(process) = self.processes.remove(&pid) {
            self.entries -= process.entries.len();
        }
    }
}

/// A digest of an unwind's raw frames (object and file offset each), to tell two unwinds that
/// gave the same frames from two that only symbolize alike.
pub fn raw_digest(frames: &[super::RawFrame]) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut hasher = foldhash::fast::FixedState::with_seed(0x5eed).build_hasher();
    for frame in frames {
        frame.module.as_deref().hash(&mut hasher);
        frame.file_offset.hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(values: &[u64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn the_probes_memo_holds_the_deciding_words() {
        let mut memo = StackMemo::default();
        let reads = |saved| vec![(8, Some(0x4000)), (16, Some(saved)), (4096, None)];
        memo.insert(7, (0x10, 0x100, 0xbb), 1, reads(0xaaa), (1, 42));
        let k = memo.kernel_memo(7, (0x10, 0x100), 4096).expect("fits");
        // A word past the end: the probe's copy must be as long.
        assert_eq!((k.site, k.span, k.count, k.reach), (42, 4096, 2, 24));
        assert_eq!(k.bp_matters, 1);
        assert_eq!(&k.offsets[..2], &[8, 16]);
        // The saved word and bp turned out not to matter: the probe stops comparing them.
        memo.insert(7, (0x10, 0x100, 0xcc), 1, reads(0xbbb), (1, 42));
        let k = memo.kernel_memo(7, (0x10, 0x100), 4096).expect("fits");
        assert_eq!((k.count, k.reach, k.bp_matters), (1, 16, 0));
        assert_eq!((k.offsets[0], k.words[0]), (8, 0x4000));
        // A read that failed inside a longer capture cannot be checked by the probe.
        assert_eq!(memo.kernel_memo(7, (0x10, 0x100), 8192), None);
        // Nothing past the end: any copy that covers the checks will do.
        memo.insert(9, (0x10, 0x100, 0xbb), 1, vec![(8, Some(0x4000))], (1, 44));
        let k = memo.kernel_memo(9, (0x10, 0x100), 4096).expect("fits");
        assert_eq!((k.span, k.reach), (0, 16));
        // Too many words for the probe.
        let many = (0..=MEMO_CHECKS as u64).map(|i| (i * 8, Some(i))).collect();
        memo.insert(8, (0x10, 0x100, 0xbb), 1, many, (2, 43));
        assert_eq!(memo.kernel_memo(8, (0x10, 0x100), 4096), None);
    }

    #[test]
    fn a_memo_needs_the_same_words_space_and_registers() {
        let mut memo = StackMemo::default();
        let stack = words(&[1, 0x4000, 3, 0x5000]);
        let reads = vec![(8, Some(0x4000)), (24, Some(0x5000)), (32, None)];
        memo.insert(7, (0x10, 0x100, 0xbb), 1, reads.clone(), (1, 42));
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &stack), Some(42));
        // Words it did not read may change.
        let other = words(&[9, 0x4000, 9, 0x5000]);
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &other), Some(42));
        // A word it read may not, nor may a read past the copy start to succeed.
        let changed = words(&[1, 0x4000, 3, 0x5008]);
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &changed), None);
        let longer = words(&[1, 0x4000, 3, 0x5000, 0x6000]);
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &longer), None);
        // Another process, ip or sp.
        assert_eq!(memo.get(8, (0x10, 0x100, 0xbb), &stack), None);
        assert_eq!(memo.get(7, (0x11, 0x100, 0xbb), &stack), None);
        assert_eq!(memo.get(7, (0x10, 0x108, 0xbb), &stack), None);
        // Another bp, until an unwind with another bp read the same words.
        assert_eq!(memo.get(7, (0x10, 0x100, 0xcc), &stack), None);
        memo.insert(7, (0x10, 0x100, 0xcc), 1, reads.clone(), (1, 42));
        assert_eq!(memo.get(7, (0x10, 0x100, 0xdd), &stack), Some(42));
    }

    #[test]
    fn a_word_that_changed_nothing_stops_being_compared() {
        let mut memo = StackMemo::default();
        let reads = |saved_bp| vec![(8, Some(0x4000)), (16, Some(saved_bp)), (24, Some(0x5000))];
        memo.insert(7, (0x10, 0x100, 0xbb), 1, reads(0xaaa), (1, 42));
        let stack = |saved_bp| words(&[0, 0x4000, saved_bp, 0x5000]);
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &stack(0xccc)), None);
        memo.insert(7, (0x10, 0x100, 0xbb), 1, reads(0xccc), (1, 42));
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &stack(0xddd)), Some(42));
        // The return addresses still count.
        let moved = words(&[0, 0x4008, 0xddd, 0x5000]);
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &moved), None);
        // Another stack from the same offsets is a new memo, compared in full again.
        memo.insert(7, (0x10, 0x100, 0xbb), 1, reads(0xeee), (1, 43));
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &stack(0xfff)), None);
    }

    #[test]
    fn a_new_address_space_or_program_drops_the_memos() {
        let mut memo = StackMemo::default();
        let stack = words(&[1, 2]);
        memo.insert(7, (0x10, 0x100, 0xbb), 1, vec![(8, Some(2))], (1, 42));
        memo.insert(7, (0x20, 0x100, 0xbb), 2, vec![(8, Some(2))], (1, 43));
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &stack), None);
        assert_eq!(memo.get(7, (0x20, 0x100, 0xbb), &stack), Some(43));
        memo.forget(7);
        assert_eq!(memo.get(7, (0x20, 0x100, 0xbb), &stack), None);
        assert_eq!(memo.entries, 0);
    }

    #[test]
    fn a_bp_that_changed_the_reads_stays_part_of_the_key() {
        let mut memo = StackMemo::default();
        let stack = words(&[1, 2, 3, 4]);
        memo.insert(7, (0x10, 0x100, 0xbb), 1, vec![(8, Some(2))], (1, 42));
        // With bp 0xcc the walk read elsewhere: bp matters here.
        memo.insert(7, (0x10, 0x100, 0xcc), 1, vec![(16, Some(3))], (1, 43));
        assert_eq!(memo.get(7, (0x10, 0x100, 0xdd), &stack), None);
        assert_eq!(memo.get(7, (0x10, 0x100, 0xcc), &stack), Some(43));
    }

    #[test]
    fn two_calls_from_one_line_teach_nothing_about_the_return_address() {
        let mut memo = StackMemo::default();
        // Two return addresses at offset 8 into one caller, one source line: one call site,
        // two different raw stacks.
        memo.insert(7, (0x10, 0x100, 0xbb), 1, vec![(8, Some(0x4000))], (1, 42));
        memo.insert(7, (0x10, 0x100, 0xbb), 1, vec![(8, Some(0x4010))], (2, 42));
        // A third caller's return address there is another stack, not a hit.
        let third = words(&[0, 0x5000]);
        assert_eq!(memo.get(7, (0x10, 0x100, 0xbb), &third), None);
        // The same raw frames from another value do teach it (a saved register, not an
        // address).
        memo.insert(7, (0x20, 0x100, 0xbb), 1, vec![(8, Some(0xaaa))], (3, 44));
        memo.insert(7, (0x20, 0x100, 0xbb), 1, vec![(8, Some(0xbbb))], (3, 44));
        assert_eq!(
            memo.get(7, (0x20, 0x100, 0xbb), &words(&[0, 0xccc])),
            Some(44)
        );
    }
}
