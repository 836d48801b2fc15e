//! Exited processes the model no longer keeps one by one, as counts.
//!
//! A server recycling a worker every 100 ms for a week exits six million processes: past
//! [`super::MAX_EXITED_KEPT`] records, the oldest exited process is folded in here (and when
//! its pid comes back), so the report still accounts for every process and every descriptor
//! left open at exit, grouped by command and call site.

use std::collections::{BTreeMap, HashMap};

use super::{FdKind, Origin, StackId};

/// Command names counted separately; the rest are counted together.
const MAX_COMMANDS: usize = 256;
/// Groups of descriptors open at exit; the rest are only counted.
const MAX_GROUPS: usize = 1_000;

/// Where descriptors open at exit came from, in folded processes of one command.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FoldedKey {
    pub comm: String,
    pub kind: FdKind,
    pub origin: Origin,
    pub stack: StackId,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldedGroup {
    /// Processes that exited with descriptors of this group open.
    pub processes: u64,
    pub open: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    /// Processes folded in.
    pub processes: u64,
    /// Of those, the ones that exited clean (nothing open but stdio), by command name; past
    /// [`MAX_COMMANDS`] names, under "" (other commands).
    pub clean: BTreeMap<String, u64>,
    /// What the others had open at exit.
    pub open_at_exit: HashMap<FoldedKey, FoldedGroup>,
    /// Descriptors open at exit in processes folded in, beyond [`MAX_GROUPS`] groups.
    pub ungrouped_open: u64,
}

impl Folded {
    pub(super) fn clean(&mut self, comm: &str) {
        self.processes += 1;
        let key = if self.clean.len() < MAX_COMMANDS || self.clean.contains_key(comm) {
            comm
        } else {
            ""
        };
        *self.clean.entry(key.to_string()).or_default() += 1;
    }

    /// A process that exited with descriptors open: `groups` is (where, how many) for each.
    pub(super) fn with_open(&mut self, groups: impl IntoIterator<Item = (FoldedKey, u64)>) {
        self.processes += 1;
        for (key, open) in groups {
            if self.open_at_exit.len() >= MAX_GROUPS && !self.open_at_exit.contains_key(&key) {
                self.ungrouped_open += open;
                continue;
            }
            let group = self.open_at_exit.entry(key).or_default();
            group.processes += 1;
            group.open += open;
        }
    }

    /// Clean exits folded in.
    pub fn clean_total(&self) -> u64 {
        self.clean.values().sum()
    }
}
