//! What /proc says about a process: its descriptors, limit, identity and stack bounds.
//!
//! These are the ground truth the model is seeded and reconciled with.

use std::{fs, io, num::NonZeroU32, path::PathBuf, sync::Arc};

use crate::{
    container::{self, Container},
    model::{FdKind, Limit, NewFd},
};

/// The kind of descriptor a /proc/PID/fd link names.
pub fn kind_of_link(link: &str) -> FdKind {
    if let Some(rest) = link.strip_prefix("anon_inode:") {
        let name = rest.trim_start_matches('[').trim_end_matches(']');
        return match name {
            "eventfd" => FdKind::Eventfd,
            "eventpoll" => FdKind::Epoll,
            "timerfd" => FdKind::Timerfd,
            "signalfd" => FdKind::Signalfd,
            "inotify" => FdKind::Inotify,
            "fanotify" => FdKind::Fanotify,
            "pidfd" => FdKind::Pidfd,
            "io_uring" => FdKind::IoUring,
            "perf_event" => FdKind::Perf,
            "userfaultfd" => FdKind::Userfaultfd,
            n if n.starts_with("bpf") || n == "btf" => FdKind::Bpf,
            _ => FdKind::Other,
        };
    }
    if link.starts_with("socket:") {
        FdKind::Socket
    } else if link.starts_with("pipe:") {
        FdKind::Pipe
    } else if link.starts_with("pidfd:") {
        FdKind::Pidfd
    } else if link.starts_with("/memfd:") {
        FdKind::Memfd
    } else {
        FdKind::File
    }
}

/// The open descriptors of `pid` with their kinds and targets, and the close-on-exec bit from
/// fdinfo. Descriptors that close while being listed are skipped.
pub fn fds(pid: u32) -> io::Result<Vec<NewFd>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(link) = fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        out.push(NewFd {
            fd,
            kind: kind_of_link(&link),
            target: Arc::from(link.as_ref()),
            cloexec: cloexec(pid, fd).unwrap_or(false),
        });
    }
    out.sort_by_key(|f| f.fd);
    Ok(out)
}

/// O_CLOEXEC from the octal `flags:` line of /proc/PID/fdinfo/FD.
fn cloexec(pid: u32, fd: i32) -> Option<bool> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    let flags = u64::from_str_radix(flags.trim(), 8).ok()?;
    Some(flags & 0o2_000_000 != 0)
}

/// The descriptor limit, from the "Max open files" line of /proc/PID/limits.
pub fn limit(pid: u32) -> io::Result<Limit> {
    parse_limits(&fs::read_to_string(format!("/proc/{pid}/limits"))?)
        .ok_or_else(|| io::Error::other("no \"Max open files\" line in limits"))
}

pub fn parse_limits(text: &str) -> Option<Limit> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut nums = line["Max open files".len()..].split_whitespace();
    let parse = |s: Option<&str>| match s? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some(Limit {
        soft: parse(nums.next())?,
        hard: parse(nums.next())?,
    })
}

/// Who a process is: command name, executable and parent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub comm: String,
    pub exe: String,
    pub ppid: u32,
}

pub fn identity(pid: u32) -> io::Result<Identity> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // comm is in parentheses and may itself contain spaces and parentheses.
    let open = stat
        .find('(')
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    let close = stat
        .rfind(')')
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    let comm = stat[open + 1..close].to_string();
    let ppid = stat_field(&stat, 4)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Identity { comm, exe, ppid })
}

/// Where a process runs: its pid in its own pid namespace and its container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub ns_pid: NonZeroU32,
    pub container: Option<Container>,
}

/// The identity (nsfs device and inode) of the `kind` namespace (`pid`, `mnt`, ...) of
/// `/proc/<proc>` (a pid, `self` or `1`), or `None` when it cannot be read (the process is
/// gone). Two processes are in the same namespace when these are equal.
pub fn namespace(proc: &str, kind: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(format!("/proc/{proc}/ns/{kind}")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The [`Placement`] of `pid`, or `None` when its status cannot be read (it has exited).
/// An unreadable cgroup file only leaves the container unknown.
pub fn placement(pid: u32) -> Option<Placement> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let nspids = nspids(&status)?;
    let ns_pid = *nspids.last()?;
    let pid_ns = |p: &str| namespace(p, "pid");
    let own_pid_namespace = match (pid_ns(&pid.to_string()), pid_ns("1")) {
        (Some(mine), Some(init)) => mine != init,
        // NSpid lists the pid in each namespace from /proc's down to the process's own.
        _ => nspids.len() > 1,
    };
    let container = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|cgroup| container::from_cgroup_file(&cgroup, own_pid_namespace));
    Some(Placement { ns_pid, container })
}

/// The `NSpid:` line of /proc/PID/status: the pid in each pid namespace, outermost first (in
/// Linux since 4.1).
fn nspids(status: &str) -> Option<Vec<NonZeroU32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let pids: Option<Vec<NonZeroU32>> = line.split_whitespace().map(|p| p.parse().ok()).collect();
    pids.filter(|p| !p.is_empty())
}

/// The part of the main thread's stack an unwinder can need: from the bottom of the `[stack]`
/// mapping up to just above `startstack`, the stack pointer the kernel handed to `_start`.
/// Everything above that is argv, the environment and the aux vector (9.7 KiB in a shell
/// here), which no frame lives in: clamping the probe's copy there keeps it from copying them.
pub fn main_stack(pid: u32) -> Option<(u64, u64)> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let line = maps.lines().find(|l| l.ends_with("[stack]"))?;
    let range = line.split_whitespace().next()?;
    let (lo, hi) = range.split_once('-')?;
    let (lo, hi) = (
        u64::from_str_radix(lo, 16).ok()?,
        u64::from_str_radix(hi, 16).ok()?,
    );
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let top = stat_field(&stat, 28)
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| lo < s && s < hi)
        // `_start` reads argc at startstack; a few words of slack cost nothing.
        .map_or(hi, |s| (s + 64).min(hi));
    Some((lo, top))
}

/// Field `n` of /proc/PID/stat, numbered as in proc(5) (4: ppid, 28: startstack), for fields
/// after the command name, which may itself hold spaces and parentheses.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// The thread ids of a process.
pub fn threads(pid: u32) -> io::Result<Vec<u32>> {
    let mut tids: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// The processes whose parent is `pid`, from /proc/PID/task/*/children.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tids) = threads(pid) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for tid in tids {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// A TCP listening socket as /proc/net/tcp shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpListener {
    /// `127.0.0.1:8000`, `0.0.0.0:80`, `[::]:8000`.
    pub address: String,
    pub inode: u64,
    /// Connections the kernel completed and the program has not accepted yet (a listener's
    /// rx_queue), and its backlog: 0 from /proc, which does not show it (see
    /// [`crate::sockdiag`]).
    pub queued: u64,
    pub backlog: u64,
}

/// The TCP listeners in `pid`'s network namespace (`/proc/PID/net/tcp` and `tcp6`).
pub fn tcp_listeners(pid: u32) -> Vec<TcpListener> {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| parse_tcp_listeners(&text))
        .collect()
}

/// The LISTEN rows of a `/proc/net/tcp` or `tcp6` table: `sl local rem st tx:rx tr:when
/// retrnsmt uid timeout inode`, the address as native-endian 32-bit words in hex.
fn parse_tcp_listeners(text: &str) -> Vec<TcpListener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&"0A") {
                return None;
            }
            let (addr, port) = fields.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            let (_, queued) = fields.get(4)?.split_once(':')?;
            let queued = u64::from_str_radix(queued, 16).ok()?;
            let words: Vec<u32> = (0..addr.len() / 8)
                .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
                .collect::<Option<_>>()?;
            let address = match words.as_slice() {
                [v4] => format!("{}:{port}", std::net::Ipv4Addr::from(v4.to_ne_bytes())),
                [a, b, c, d] => {
                    let mut bytes = [0u8; 16];
                    for (chunk, w) in bytes.chunks_mut(4).zip([a, b, c, d]) {
                        chunk.copy_from_slice(&w.to_ne_bytes());
                    }
                    format!("[{}]:{port}", std::net::Ipv6Addr::from(bytes))
                }
                _ => return None,
            };
            Some(TcpListener {
                address,
                inode,
                queued,
                backlog: 0,
            })
        })
        .collect()
}

/// `TcpExt: ListenOverflows` of `pid`'s network namespace (/proc/PID/net/netstat): how many
/// times a listener's accept queue was full when a handshake completed, each a connection
/// dropped (its client retries the SYN, then a proxy's connect times out: 504).
pub fn listen_overflows(pid: u32) -> Option<u64> {
    parse_listen_overflows(&fs::read_to_string(format!("/proc/{pid}/net/netstat")).ok()?)
}

/// The netstat file's `TcpExt:` header line and the value line after it.
fn parse_listen_overflows(text: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// The socket inodes among `pid`'s descriptors.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| {
            let link = fs::read_link(fd.path()).ok()?;
            link.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The processes holding each socket inode of `inodes`, as "comm pid N", from every
/// /proc/PID/fd (a scan of the machine's processes: for reports, not for every event).
pub fn socket_owners(inodes: &[u64]) -> std::collections::BTreeMap<u64, String> {
    let mut owners = std::collections::BTreeMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return owners;
    };
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        for inode in socket_inodes(pid) {
            if inodes.contains(&inode) && !owners.contains_key(&inode) {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                owners.insert(inode, format!("{} pid {pid}", comm.trim()));
            }
        }
        if owners.len() == inodes.len() {
            break;
        }
    }
    owners
}

/// `[address]:port` of the IPv6 socket `pid`'s network namespace has listening on `port`,
/// from /proc/PID/net/tcp6 (the probe reads only the port of an IPv6 listener).
pub fn listening_v6(pid: u32, port: u16) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/tcp6")).ok()?;
    parse_listening_v6(&text, port)
}

/// The `/proc/net/tcp6` half of [`listening_v6`]: `sl local_address rem_address st ...`, the
/// address as four native-endian 32-bit words in hex, `st` 0A for LISTEN.
fn parse_listening_v6(text: &str, port: u16) -> Option<String> {
    text.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        let (addr, p) = local.split_once(':')?;
        if state != "0A" || u16::from_str_radix(p, 16).ok()? != port || addr.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Some(format!("[{}]:{port}", std::net::Ipv6Addr::from(bytes)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_overflows_are_read_by_name() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops
TcpExt: 0 0 17 17
IpExt: InNoRoutes
IpExt: 0
";
        assert_eq!(parse_listen_overflows(text), Some(17));
        assert_eq!(parse_listen_overflows("IpExt: A\nIpExt: 1\n"), None);
    }

    #[test]
    fn tcp_listeners_are_read_with_their_inodes() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000080:0000000C 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F40 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(
            parse_tcp_listeners(v4),
            [TcpListener {
                address: "127.0.0.1:8000".into(),
                inode: 4242,
                queued: 12,
                backlog: 0
            }]
        );
    }

    #[test]
    fn an_ipv6_listener_is_found_by_port() {
        let text = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0
   2: 00000000000000000000000001000000:1F41 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 12347 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(parse_listening_v6(text, 8000).as_deref(), Some("[::]:8000"));
        assert_eq!(
            parse_listening_v6(text, 8080).as_deref(),
            Some("[::1]:8080")
        );
        // Port 8001 is an established connection, not a listener.
        assert_eq!(parse_listening_v6(text, 8001), None);
    }

    #[test]
    fn kinds_from_links() {
        for (link, kind) in [
            ("/etc/hostname", FdKind::File),
            ("socket:[1234]", FdKind::Socket),
            ("pipe:[99]", FdKind::Pipe),
            ("anon_inode:[eventfd]", FdKind::Eventfd),
            ("anon_inode:[eventpoll]", FdKind::Epoll),
            ("anon_inode:[timerfd]", FdKind::Timerfd),
            ("anon_inode:[signalfd]", FdKind::Signalfd),
            ("anon_inode:inotify", FdKind::Inotify),
            ("anon_inode:[fanotify]", FdKind::Fanotify),
            ("/memfd:buf (deleted)", FdKind::Memfd),
            ("anon_inode:[pidfd]", FdKind::Pidfd),
            ("anon_inode:[io_uring]", FdKind::IoUring),
            ("anon_inode:bpf-map", FdKind::Bpf),
            ("anon_inode:[perf_event]", FdKind::Perf),
            ("anon_inode:[userfaultfd]", FdKind::Userfaultfd),
            ("anon_inode:[something]", FdKind::Other),
        ] {
            assert_eq!(kind_of_link(link), kind, "{link}");
        }
    }

    #[test]
    fn limits_parse() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(
            parse_limits(text),
            Some(Limit {
                soft: 1024,
                hard: 524_288
            })
        );
        let text = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(
            parse_limits(text),
            Some(Limit {
                soft: u64::MAX,
                hard: u64::MAX
            })
        );
        assert_eq!(parse_limits("nothing"), None);
    }

    #[test]
    fn stat_fields_count_past_the_command_name() {
        let stat = "77 (a) b) S 1 77 77 0 -1 4194560 120 0 0 0 0 0 0 0 20 0 1 0 5 2 1 \
                    18446744073709551615 1 1 140736193540048 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(stat_field(stat, 28), Some("140736193540048"));
        assert_eq!(stat_field(stat, 4), Some("1"));
        assert_eq!(stat_field("garbage", 28), None);
    }

    #[test]
    fn nspid_lists_the_pid_in_each_namespace() {
        let nested = "Name:\tsleep\nTgid:\t81234\nNSpid:\t81234\t7\nNSpgid:\t81234\t7\n";
        let pids = nspids(nested).unwrap();
        assert_eq!(pids.iter().map(|p| p.get()).collect::<Vec<_>>(), [81234, 7]);
        assert_eq!(
            nspids("NSpid:\t55\n").unwrap(),
            [NonZeroU32::new(55).unwrap()]
        );
        for bad in ["Name:\tx\n", "NSpid:\n", "NSpid:\t12\tx\n", "NSpid:\t0\n"] {
            assert_eq!(nspids(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        let fds = fds(me).unwrap();
        assert!(fds.iter().any(|f| f.fd == 0));
        let id = identity(me).unwrap();
        assert!(!id.comm.is_empty());
        assert!(limit(me).unwrap().soft > 0);
        // getpid() is also the pid in the process's own namespace.
        let here = placement(me).unwrap();
        assert_eq!(here.ns_pid.get(), me);
        let (lo, hi) = main_stack(me).unwrap();
        assert!(lo < hi);
        // Clamped below the mapping's end: argv and the aux vector are always above it.
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps.lines().find(|l| l.ends_with("[stack]")).unwrap();
        let end = line.split(['-', ' ']).nth(1).unwrap();
        assert!(hi < u64::from_str_radix(end, 16).unwrap());
    }
}
