//! Choosing processes by what they are rather than by pid: `--comm NAME`, `--cgroup PATH` and
//! `--container ID`, which also take in processes that start matching later.
//!
//! The kernel side does the "later" part: the exec probe adopts an untraced process whose new
//! program matches the selection maps (see `fdtrace-ebpf`'s `adopt`), so a restarted server or
//! a new container's processes are traced from their first instruction. This module turns the
//! command line into those maps' keys (comms, cgroup ids), finds the processes that match
//! already when tracing starts, and rescans for the few ways of matching without an exec
//! (a process moved into a cgroup, or renamed with prctl).

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use fdtrace_common::select::{CGROUP, CGROUP_LEVELS, COMM, COMM_LEN};
use thiserror::Error;

use crate::{clock, model::Pid};

/// Where the cgroup v2 hierarchy is mounted on current systems; hybrid ones (systemd's cgroup
/// v1 layout) have it at /sys/fs/cgroup/unified, see [`cgroup2_root`].
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// `statfs` magic of cgroup v2 (include/uapi/linux/magic.h); `f_type`'s width varies by
/// architecture, the magic numbers are 32-bit.
const CGROUP2_SUPER_MAGIC: u32 = 0x6367_7270;
/// Fewer hex digits than this match too many containers to mean one.
pub const CONTAINER_PREFIX_MIN: usize = 4;
/// How container runtimes name the cgroup of a container `ID` under systemd: `PREFIXID.scope`.
/// (With the cgroupfs driver it is a directory named `ID` itself.)
const CONTAINER_SCOPES: [&str; 4] = ["docker-", "libpod-", "cri-containerd-", "crio-"];
/// A full container id: 64 hex digits (docker, podman, containerd and CRI-O alike).
const CONTAINER_ID_LEN: usize = 64;
/// `PF_KTHREAD` in /proc/PID/stat's flags: kernel threads have a comm but nothing to trace.
const PF_KTHREAD: u64 = 0x0020_0000;

/// A selector that cannot select anything, each with the one line that says why.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("--comm {name:?}: {why}")]
    BadComm { name: String, why: &'static str },
    #[error("--cgroup {arg}: no such cgroup directory under {root}")]
    CgroupNotFound { arg: String, root: String },
    #[error("--cgroup {arg}: {dir} is not under {root}, where cgroup v2 is mounted")]
    CgroupOutside {
        arg: String,
        dir: String,
        root: String,
    },
    #[error(
        "--cgroup {arg}: that is the root cgroup, which holds every process on the machine; name a cgroup below it"
    )]
    CgroupRoot { arg: String },
    #[error(
        "--cgroup {arg}: {dir} is not a cgroup v2 directory (BPF knows processes' cgroups by the unified hierarchy)"
    )]
    NotCgroup2 { arg: String, dir: String },
    #[error(
        "--container {arg}: give a container id, or a prefix of it of at least {CONTAINER_PREFIX_MIN} hex digits"
    )]
    BadContainerId { arg: String },
    #[error(
        "--container {arg}: no container cgroup under {root} has that id (looked for docker-ID.scope, libpod-ID.scope, cri-containerd-ID.scope, crio-ID.scope and directories named ID)"
    )]
    ContainerNotFound { arg: String, root: String },
    #[error("--container {arg}: ambiguous, the ids of {} containers start with it ({}); give more of it", ids.len(), short_ids(ids))]
    ContainerAmbiguous { arg: String, ids: Vec<String> },
    #[error(
        "{arg}: no cgroup v2 hierarchy is mounted, and BPF knows processes' cgroups by it: mount -t cgroup2 none /sys/fs/cgroup/unified"
    )]
    NoCgroup2 { arg: String },
    #[error("--container {arg}: reading {root}: {error}")]
    CgroupUnreadable {
        arg: String,
        root: String,
        error: String,
    },
}

fn short_ids(ids: &[String]) -> String {
    let shown: Vec<&str> = ids
        .iter()
        .take(5)
        .map(|id| &id[..id.len().min(12)])
        .collect();
    let more = if ids.len() > shown.len() { ", ..." } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// A `--comm`: the name as the kernel keeps it, cut to 15 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comm {
    /// The name cut as the kernel cuts it (bytes, so possibly inside a UTF-8 character).
    pub bytes: Vec<u8>,
}

impl Comm {
    pub fn parse(name: &str) -> Result<Self, SelectError> {
        let bad = |why| SelectError::BadComm {
            name: name.to_string(),
            why,
        };
        if name.is_empty() {
            return Err(bad("give a process name as /proc/PID/comm shows it"));
        }
        // The kernel names a process after its program's file name; a path here is a mistake
        // that would select nothing.
        if name.contains('/') {
            return Err(bad(
                "a process name has no '/': give the program's file name (e.g. uvicorn), as /proc/PID/comm shows it",
            ));
        }
        let bytes = name.as_bytes();
        Ok(Self {
            bytes: bytes[..bytes.len().min(COMM_LEN - 1)].to_vec(),
        })
    }

    /// The selection map's key: the name NUL-padded, as `bpf_get_current_comm` fills it.
    pub fn key(&self) -> [u8; COMM_LEN] {
        let mut key = [0; COMM_LEN];
        key[..self.bytes.len()].copy_from_slice(&self.bytes);
        key
    }

    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Whether a comm read from /proc/PID/comm (newline included or not) is this one.
    pub fn matches(&self, proc_comm: &[u8]) -> bool {
        proc_comm.strip_suffix(b"\n").unwrap_or(proc_comm) == self.bytes.as_slice()
    }
}

/// A cgroup v2 directory whose processes, and its descendants' processes, are selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// What the user named, for messages: `cgroup PATH` or `container ID (DIR)`.
    pub label: String,
    pub dir: PathBuf,
    /// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`), which is the
    /// directory's inode number.
    pub id: u64,
}

/// Everything the command line selects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub pids: Vec<Pid>,
    pub comms: Vec<Comm>,
    pub cgroups: Vec<Cgroup>,
}

impl Selection {
    /// Resolves the selectors against this machine's cgroup hierarchy. Pids are taken as
    /// given (the caller says which do not exist).
    pub fn resolve(
        pids: &[Pid],
        comms: &[String],
        cgroups: &[String],
        containers: &[String],
    ) -> Result<Self, SelectError> {
        let root = if let Some(root) = cgroup2_root() {
            root
        } else {
            let first = cgroups
                .first()
                .map(|c| format!("--cgroup {c}"))
                .or_else(|| containers.first().map(|c| format!("--container {c}")));
            if let Some(arg) = first {
                return Err(SelectError::NoCgroup2 { arg });
            }
            // No selector needs it.
            PathBuf::from(CGROUP_ROOT)
        };
        let mut selection = Self::resolve_in(&root, pids, comms, cgroups, containers)?;
        for cgroup in &mut selection.cgroups {
            if !is_cgroup2(&cgroup.dir) {
                return Err(SelectError::NotCgroup2 {
                    arg: cgroup.label.clone(),
                    dir: cgroup.dir.display().to_string(),
                });
            }
        }
        Ok(selection)
    }

    /// [`Selection::resolve`] with the hierarchy at `root`, without the file system check.
    fn resolve_in(
        root: &Path,
        pids: &[Pid],
        comms: &[String],
        cgroups: &[String],
        containers: &[String],
    ) -> Result<Self, SelectError> {
        let mut selection = Self {
            pids: pids.to_vec(),
            comms: Vec::new(),
            cgroups: Vec::new(),
        };
        for name in comms {
            let comm = Comm::parse(name)?;
            if !selection.comms.contains(&comm) {
                selection.comms.push(comm);
            }
        }
        for arg in cgroups {
            selection.add_cgroup(resolve_cgroup(root, arg)?);
        }
        for arg in containers {
            for cgroup in resolve_container(root, arg)? {
                selection.add_cgroup(cgroup);
            }
        }
        Ok(selection)
    }

    fn add_cgroup(&mut self, cgroup: Cgroup) {
        if !self.cgroups.iter().any(|c| c.id == cgroup.id) {
            self.cgroups.push(cgroup);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && !self.selects_later()
    }

    /// Whether processes that start later can match: by comm or cgroup. Such a selection
    /// follows children, and tracing goes on while no process matches.
    pub fn selects_later(&self) -> bool {
        !self.comms.is_empty() || !self.cgroups.is_empty()
    }

    /// The selection maps the exec probe must consult (`ProbeOptions::select`).
    pub fn probe_bits(&self) -> u32 {
        let mut bits = 0;
        if !self.comms.is_empty() {
            bits |= COMM;
        }
        if !self.cgroups.is_empty() {
            bits |= CGROUP;
        }
        bits
    }

    /// The comm and cgroup selectors in words, e.g. `comm uvicorn, cgroup system.slice/x`.
    pub fn describe_later(&self) -> String {
        self.comms
            .iter()
            .map(|c| format!("comm {}", c.name()))
            .chain(self.cgroups.iter().map(|c| c.label.clone()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The processes matching the comm and cgroup selectors now (not the pids), but for
    /// `except` (fdtrace itself) and kernel threads.
    pub fn matching_now(&self, except: Pid) -> BTreeSet<Pid> {
        let mut found = BTreeSet::new();
        for cgroup in &self.cgroups {
            pids_below(&cgroup.dir, 0, &mut found);
        }
        if !self.comms.is_empty() {
            for pid in all_pids() {
                if let Ok(comm) = fs::read(format!("/proc/{pid}/comm"))
                    && self.comms.iter().any(|c| c.matches(&comm))
                {
                    found.insert(pid);
                }
            }
        }
        found.remove(&except);
        found.retain(|&pid| !is_kernel_thread(pid));
        found
    }
}

/// Every process's pid, from /proc.
fn all_pids() -> Vec<Pid> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Adds the processes in `dir` and in the cgroups below it to `out`. A cgroup removed
/// meanwhile is skipped.
fn pids_below(dir: &Path, depth: u32, out: &mut BTreeSet<Pid>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        // Processes of another pid namespace than ours read as 0.
        out.extend(
            text.split_whitespace()
                .filter_map(|s| s.parse::<Pid>().ok())
                .filter(|&p| p != 0),
        );
    }
    if depth >= CGROUP_LEVELS {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            pids_below(&entry.path(), depth + 1, out);
        }
    }
}

/// The fields of /proc/PID/stat after the comm (which may hold spaces and parentheses): the
/// first is the state, field 3 in proc(5).
fn stat_fields(pid: Pid) -> Option<Vec<u64>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // The state is a letter: numbered from it, field N of proc(5) is at N - 3.
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

fn is_kernel_thread(pid: Pid) -> bool {
    // flags is field 9.
    stat_fields(pid)
        .and_then(|f| f.get(9 - 4).copied())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// Whether process `pid` started after the monotonic time `mono_ns`: then a record of that
/// time was about an earlier process that had the same pid, which has exited since. False
/// when it cannot tell.
pub fn started_after(pid: Pid, mono_ns: u64) -> bool {
    // starttime (field 22) is in clock ticks of CLOCK_BOOTTIME, rounded down.
    let Some(ticks) = stat_fields(pid).and_then(|f| f.get(22 - 4).copied()) else {
        return false;
    };
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let Ok(hz) = u64::try_from(hz) else {
        return false;
    };
    if hz == 0 {
        return false;
    }
    let started_boot_ns = ticks.saturating_mul(1_000_000_000) / hz;
    // Boot time runs ahead of monotonic time by the time spent suspended.
    let suspended = clock::now(libc::CLOCK_BOOTTIME).saturating_sub(clock::monotonic_ns());
    // One tick of slack for the rounding.
    started_boot_ns > mono_ns + suspended + 1_000_000_000 / hz
}

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on
/// hybrid systems, or wherever /proc/self/mountinfo says.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mounts = cgroup2_mounts(&info);
    let preferred = [
        Path::new(CGROUP_ROOT),
        &Path::new(CGROUP_ROOT).join("unified"),
    ]
    .into_iter()
    .find(|p| mounts.iter().any(|m| m == p))
    .map(Path::to_path_buf);
    preferred.or_else(|| mounts.into_iter().next())
}

/// The mount points of cgroup2 file systems in a mountinfo text (proc(5)): the fifth field,
/// octal escapes undone; the file system type is the first field after " - ".
fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(unescape_mount)
        })
        .collect()
}

/// Undoes mountinfo's `\NNN` octal escapes (of space, tab, newline and backslash).
fn unescape_mount(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Whether `dir` is on a cgroup v2 file system.
fn is_cgroup2(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs is a valid buffer for the call to fill.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and buffer.
    let r = unsafe { libc::statfs(path.as_ptr(), &raw mut buf) };
    r == 0 && buf.f_type as u32 == CGROUP2_SUPER_MAGIC
}

/// A `--cgroup` argument: a path relative to `root`, an absolute one under it, or the form
/// /proc/PID/cgroup shows (`/system.slice/x.service`, relative to the root too).
fn resolve_cgroup(root: &Path, arg: &str) -> Result<Cgroup, SelectError> {
    let root_str = root.display().to_string();
    let given = Path::new(arg);
    let path = if given.starts_with(root) {
        given.to_path_buf()
    } else {
        root.join(arg.trim_start_matches('/'))
    };
    let not_found = || SelectError::CgroupNotFound {
        arg: arg.to_string(),
        root: root_str.clone(),
    };
    let dir = path.canonicalize().map_err(|_| not_found())?;
    let real_root = root.canonicalize().map_err(|_| not_found())?;
    if !dir.starts_with(&real_root) {
        return Err(SelectError::CgroupOutside {
            arg: arg.to_string(),
            dir: dir.display().to_string(),
            root: root_str,
        });
    }
    if dir == real_root {
        return Err(SelectError::CgroupRoot {
            arg: arg.to_string(),
        });
    }
    if !dir.join("cgroup.procs").exists() {
        return Err(not_found());
    }
    let id = fs::metadata(&dir).map_err(|_| not_found())?.ino();
    let relative = dir.strip_prefix(&real_root).unwrap_or(&dir);
    Ok(Cgroup {
        label: format!("cgroup {}", relative.display()),
        dir,
        id,
    })
}

/// The container id in a cgroup directory's name, if it names a container's cgroup.
fn container_id_of(name: &str) -> Option<&str> {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(stem) = name.strip_suffix(".scope") {
        // libpod-conmon-ID.scope and crio-conmon-ID.scope hold the runtime's monitor, not
        // the container: "conmon-ID" is no hex id, so they do not match.
        return CONTAINER_SCOPES
            .iter()
            .find_map(|p| stem.strip_prefix(p))
            .filter(|id| hex(id));
    }
    (name.len() == CONTAINER_ID_LEN && hex(name)).then_some(name)
}

/// The cgroups of the one container whose id starts with `arg`.
fn resolve_container(root: &Path, arg: &str) -> Result<Vec<Cgroup>, SelectError> {
    let prefix = arg.to_ascii_lowercase();
    if prefix.len() < CONTAINER_PREFIX_MIN
        || prefix.len() > CONTAINER_ID_LEN
        || !prefix.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(SelectError::BadContainerId {
            arg: arg.to_string(),
        });
    }
    let mut matches: Vec<(String, PathBuf)> = Vec::new();
    find_containers(root, &prefix, 0, &mut matches).map_err(|e| SelectError::CgroupUnreadable {
        arg: arg.to_string(),
        root: root.display().to_string(),
        error: e.to_string(),
    })?;
    let ids: BTreeSet<String> = matches.iter().map(|(id, _)| id.clone()).collect();
    match ids.len() {
        0 => Err(SelectError::ContainerNotFound {
            arg: arg.to_string(),
            root: root.display().to_string(),
        }),
        1 => matches
            .into_iter()
            .map(|(id, dir)| {
                let meta = fs::metadata(&dir).map_err(|_| SelectError::ContainerNotFound {
                    arg: arg.to_string(),
                    root: root.display().to_string(),
                })?;
                let name = dir.file_name().map_or_else(
                    || dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                Ok(Cgroup {
                    label: format!("container {} ({name})", &id[..id.len().min(12)]),
                    dir,
                    id: meta.ino(),
                })
            })
            .collect(),
        _ => Err(SelectError::ContainerAmbiguous {
            arg: arg.to_string(),
            ids: ids.into_iter().collect(),
        }),
    }
}

/// Collects the directories below `dir` that are a container's cgroup with an id starting
/// with `prefix`; does not look inside those (their subdirectories are selected with them).
fn find_containers(
    dir: &Path,
    prefix: &str,
    depth: u32,
    out: &mut Vec<(String, PathBuf)>,
) -> std::io::Result<()> {
    if depth >= CGROUP_LEVELS {
        return Ok(());
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        // Only the top must be readable; a cgroup removed meanwhile is skipped.
        Err(e) if depth == 0 => return Err(e),
        Err(_) => return Ok(()),
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match container_id_of(&name) {
            Some(id) if id.to_ascii_lowercase().starts_with(prefix) => {
                out.push((id.to_ascii_lowercase(), entry.path()));
            }
            _ => find_containers(&entry.path(), prefix, depth + 1, out)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup hierarchy in a temporary directory: each path a directory with a
    /// cgroup.procs listing `procs`.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("fdtrace-select-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).unwrap();
            Self(root)
        }

        fn add(&self, path: &str, procs: &[Pid]) -> &Self {
            let dir = self.0.join(path);
            fs::create_dir_all(&dir).unwrap();
            let text: String = procs.iter().map(|p| p.to_string() + "\n").collect();
            fs::write(dir.join("cgroup.procs"), text).unwrap();
            self
        }

        fn ino(&self, path: &str) -> u64 {
            fs::metadata(self.0.join(path)).unwrap().ino()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const ID_A: &str = "3f2a9c0d1e2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5";
    const ID_B: &str = "3f2b000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn cgroup2_is_found_in_mountinfo() {
        let hybrid = "35 24 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      42 35 0:39 / /sys/fs/cgroup/memory rw shared:12 - cgroup cgroup rw,memory\n";
        assert_eq!(
            cgroup2_mounts(hybrid),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n\
                       90 30 0:50 / /tmp/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mounts(unified),
            vec![PathBuf::from("/sys/fs/cgroup"), PathBuf::from("/tmp/my cg")]
        );
        assert!(cgroup2_mounts("").is_empty());
        // This machine has one somewhere, and it is cgroup v2.
        if let Some(root) = cgroup2_root() {
            assert!(is_cgroup2(&root), "{}", root.display());
        }
    }

    #[test]
    fn comms_are_cut_as_the_kernel_cuts_them() {
        let long = Comm::parse("a_very_long_program_name").unwrap();
        assert_eq!(long.bytes, b"a_very_long_pro");
        assert_eq!(&long.key()[..], b"a_very_long_pro\0");
        assert!(long.matches(b"a_very_long_pro\n"));
        assert!(!long.matches(b"a_very_long_pr\n"));
        let short = Comm::parse("uvicorn").unwrap();
        assert_eq!(&short.key()[..8], b"uvicorn\0");
        assert!(short.key()[7..].iter().all(|&b| b == 0));
        assert!(short.matches(b"uvicorn"));
        assert!(!short.matches(b"uvicorn2\n"));
        assert!(matches!(Comm::parse(""), Err(SelectError::BadComm { .. })));
        assert!(matches!(
            Comm::parse("/usr/bin/uvicorn"),
            Err(SelectError::BadComm { .. })
        ));
    }

    #[test]
    fn cgroup_paths_resolve_relative_absolute_and_as_proc_shows_them() {
        let tree = Tree::new("paths");
        tree.add("system.slice/app.service", &[10]);
        let root = tree.0.clone();
        let want = tree.ino("system.slice/app.service");
        let abs = root.join("system.slice/app.service");
        for arg in [
            "system.slice/app.service",
            "/system.slice/app.service",
            abs.to_str().unwrap(),
            "system.slice/../system.slice/app.service/",
        ] {
            let cg = resolve_cgroup(&root, arg).unwrap_or_else(|e| panic!("{arg}: {e}"));
            assert_eq!(cg.id, want, "{arg}");
            assert_eq!(cg.label, "cgroup system.slice/app.service");
        }
        assert!(matches!(
            resolve_cgroup(&root, "system.slice/nope.service"),
            Err(SelectError::CgroupNotFound { .. })
        ));
        assert!(matches!(
            resolve_cgroup(&root, "/"),
            Err(SelectError::CgroupRoot { .. })
        ));
        assert!(matches!(
            resolve_cgroup(&root, ".."),
            Err(SelectError::CgroupOutside { .. })
        ));
        // A directory that is no cgroup (no cgroup.procs).
        fs::create_dir_all(root.join("plain/dir")).unwrap();
        assert!(matches!(
            resolve_cgroup(&root, "plain/dir"),
            Err(SelectError::CgroupNotFound { .. })
        ));
    }

    #[test]
    fn containers_resolve_by_unique_prefix_in_every_runtimes_naming() {
        let tree = Tree::new("containers");
        for (path, id) in [
            (format!("system.slice/docker-{ID_A}.scope"), ID_A),
            (format!("machine.slice/libpod-{ID_A}.scope"), ID_A),
            (format!("kubepods/pod1/{ID_B}"), ID_B),
        ] {
            tree.add(&path, &[20]);
            let (found, got) = (container_id_of(path.rsplit('/').next().unwrap()), id);
            assert_eq!(found, Some(got), "{path}");
        }
        tree.add(&format!("machine.slice/libpod-conmon-{ID_A}.scope"), &[21]);
        tree.add(&format!("system.slice/docker-{ID_A}.scope/init"), &[22]);
        let root = tree.0.clone();

        let found = resolve_container(&root, &ID_A[..12]).unwrap();
        let dirs: BTreeSet<PathBuf> = found.iter().map(|c| c.dir.clone()).collect();
        let want: BTreeSet<PathBuf> = [
            root.join(format!("system.slice/docker-{ID_A}.scope")),
            root.join(format!("machine.slice/libpod-{ID_A}.scope")),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            dirs, want,
            "the conmon scope and the nested directory are not matched on their own"
        );
        assert_eq!(found[0].label.split(' ').nth(1), Some(&ID_A[..12]));
        assert_eq!(
            resolve_container(&root, &ID_B[..6].to_ascii_uppercase())
                .unwrap()
                .len(),
            1
        );

        // "3f2" would do for both, and is too short anyway; "3f2a"/"3f2b" are unique.
        assert!(matches!(
            resolve_container(&root, "3f2"),
            Err(SelectError::BadContainerId { .. })
        ));
        let err = resolve_container(&root, "3f2a").map(|_| ());
        assert_eq!(err, Ok(()));
        tree.add(
            "system.slice/docker-3f2a000000000000000000000000000000000000000000000000000000000000.scope",
            &[],
        );
        let err = resolve_container(&root, "3f2a").unwrap_err();
        assert!(matches!(err, SelectError::ContainerAmbiguous { ref ids, .. } if ids.len() == 2));
        assert!(err.to_string().contains("ambiguous"), "{err}");
        assert!(!err.to_string().contains('\n'));
        assert!(matches!(
            resolve_container(&root, "abcdef"),
            Err(SelectError::ContainerNotFound { .. })
        ));
        assert!(matches!(
            resolve_container(&root, "not-hex"),
            Err(SelectError::BadContainerId { .. })
        ));
        assert_eq!(container_id_of("init.scope"), None);
        assert_eq!(container_id_of("user.slice"), None);
        assert_eq!(
            container_id_of("cafe"),
            None,
            "a bare name must be a whole id"
        );
        assert_eq!(container_id_of(&format!("crio-{ID_B}.scope")), Some(ID_B));
        assert_eq!(
            container_id_of(&format!("cri-containerd-{ID_B}.scope")),
            Some(ID_B)
        );

        // Selected cgroups' processes, the nested directory's included.
        let sel = Selection::resolve_in(&root, &[], &[], &[], &[ID_A[..8].to_string()]).unwrap();
        let mut pids = BTreeSet::new();
        for cg in &sel.cgroups {
            pids_below(&cg.dir, 0, &mut pids);
        }
        assert_eq!(pids, [20, 22].into_iter().collect());
        assert_eq!(sel.probe_bits(), CGROUP);
        assert!(sel.selects_later());
    }

    #[test]
    fn selections_say_what_they_select() {
        let tree = Tree::new("describe");
        tree.add("app", &[]);
        let sel = Selection::resolve_in(
            &tree.0,
            &[7],
            &["uvicorn".into(), "uvicorn".into()],
            &["app".into(), "/app".into()],
            &[],
        )
        .unwrap();
        assert_eq!(sel.comms.len(), 1, "duplicates are one selector");
        assert_eq!(sel.cgroups.len(), 1);
        assert_eq!(sel.describe_later(), "comm uvicorn, cgroup app");
        assert_eq!(sel.probe_bits(), COMM | CGROUP);
        let pids_only = Selection::resolve_in(&tree.0, &[7], &[], &[], &[]).unwrap();
        assert!(!pids_only.selects_later() && !pids_only.is_empty());
        assert_eq!(pids_only.probe_bits(), 0);
        assert!(Selection::default().is_empty());
    }

    #[test]
    fn this_process_matches_its_own_comm_but_is_left_out() {
        let own = std::process::id();
        let comm = fs::read(format!("/proc/{own}/comm")).unwrap();
        let name = String::from_utf8_lossy(comm.strip_suffix(b"\n").unwrap()).into_owned();
        let sel = Selection {
            comms: vec![Comm::parse(&name).unwrap()],
            ..Selection::default()
        };
        assert!(sel.matching_now(0).contains(&own));
        assert!(!sel.matching_now(own).contains(&own));
    }

    #[test]
    fn processes_started_after_a_time_are_told_apart() {
        let own = std::process::id();
        assert!(!started_after(own, clock::monotonic_ns()));
        assert!(started_after(own, 0) || clock::monotonic_ns() < 10_000_000_000);
        assert!(!started_after(u32::MAX, 0), "no such process: cannot tell");
    }

    #[test]
    fn kernel_threads_are_recognized() {
        // kthreadd is pid 2 in the initial pid namespace.
        if fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            assert!(is_kernel_thread(2));
        }
        assert!(!is_kernel_thread(std::process::id()));
    }
}
