//! `record --redact`: paths, peer addresses, arguments and the host name become stable tokens.
//!
//! A token is a keyed hash (SipHash with a random key made for this file and never written),
//! so the same input gives the same token throughout one recording, which keeps call sites,
//! targets and processes distinguishable, while the tokens say nothing outside it. Function
//! names, source file basenames, module names and descriptor kinds are kept: they are what a
//! maintainer needs to find the leak. So are container ids: random, they name nothing outside
//! the host, and they are what `docker ps` there matches; a container's cgroup path is a path.

use std::{
    hash::{BuildHasher as _, RandomState},
    sync::Arc,
};

use crate::{
    container::Container,
    model::{Event, FdKind, NewFd, ProcessInfo},
    stack::Frame,
};

pub struct Redactor {
    key: RandomState,
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new()
    }
}

impl Redactor {
    pub fn new() -> Self {
        Self {
            key: RandomState::new(),
        }
    }

    /// `prefix-` and 12 hex digits of the keyed hash of `input`.
    pub fn token(&self, prefix: &str, input: &str) -> String {
        let hash = self.key.hash_one((prefix, input));
        format!("{prefix}-{:012x}", hash & 0xffff_ffff_ffff)
    }

    /// A path with its directory replaced by a token and its file name kept.
    pub fn path(&self, path: &str) -> String {
        match path.rsplit_once('/') {
            Some((dir, name)) => format!("{}/{name}", self.token("dir", dir)),
            None => path.to_string(),
        }
    }

    /// A descriptor target: paths and peer addresses become tokens; generic names stay.
    pub fn target(&self, kind: FdKind, target: &str) -> String {
        match kind {
            FdKind::Socket if target.starts_with("socket:[") => target.to_string(),
            FdKind::Socket if target.contains(':') => self.token("peer", target),
            FdKind::Memfd => self.token("memfd", target),
            _ if target.contains('/') => self.token("path", target),
            _ => target.to_string(),
        }
    }

    pub fn argv(&self, argv: &[String]) -> Vec<String> {
        argv.iter()
            .enumerate()
            .map(|(i, arg)| {
                if i == 0 {
                    self.path(arg)
                } else {
                    self.token("arg", arg)
                }
            })
            .collect()
    }

    pub fn frames(&self, frames: &[Frame]) -> Vec<Frame> {
        frames
            .iter()
            .map(|f| Frame {
                file: f
                    .file
                    .as_deref()
                    .map(|file| file.rsplit('/').next().unwrap_or(file).to_string()),
                path: f.path.as_deref().map(|p| self.path(p)),
                module: f
                    .module
                    .as_deref()
                    .map(|m| m.rsplit('/').next().unwrap_or(m).to_string()),
                ..f.clone()
            })
            .collect()
    }

    fn info(&self, info: &ProcessInfo) -> ProcessInfo {
        ProcessInfo {
            exe: self.path(&info.exe),
            container: self.container(info.container.as_ref()),
            ..info.clone()
        }
    }

    /// A cgroup path redacted as a path, still absolute so that it reads as a path.
    fn container(&self, container: Option<&Arc<Container>>) -> Option<Arc<Container>> {
        let container = container?;
        match container.as_ref() {
            Container::Id(_) => Some(container.clone()),
            Container::Cgroup(path) => Some(Arc::new(Container::Cgroup(format!(
                "/{}",
                self.path(path.trim_start_matches('/'))
            )))),
        }
    }

    fn fds(&self, fds: &[NewFd]) -> Vec<NewFd> {
        fds.iter()
            .map(|f| NewFd {
                target: Arc::from(self.target(f.kind, &f.target)),
                ..f.clone()
            })
            .collect()
    }

    /// The event with every path and address in it replaced.
    pub fn event(&self, event: &Event) -> Event {
        match event {
            Event::Attached { pid, ts, info, fds } => Event::Attached {
                pid: *pid,
                ts: *ts,
                info: self.info(info),
                fds: self.fds(fds),
            },
            Event::Opened {
                pid,
                tid,
                ts,
                syscall,
                fds,
                stack,
            } => Event::Opened {
                pid: *pid,
                tid: *tid,
                ts: *ts,
                syscall: *syscall,
                fds: self.fds(fds),
                stack: *stack,
            },
            Event::Exec { pid, ts, info } => Event::Exec {
                pid: *pid,
                ts: *ts,
                info: self.info(info),
            },
            Event::Forked {
                parent,
                child,
                ts,
                shares_table,
                ns_pid,
                container,
            } => Event::Forked {
                parent: *parent,
                child: *child,
                ts: *ts,
                shares_table: *shares_table,
                ns_pid: *ns_pid,
                container: self.container(container.as_ref()),
            },
            Event::Reconciled { pid, ts, fds } => Event::Reconciled {
                pid: *pid,
                ts: *ts,
                fds: self.fds(fds),
            },
            Event::UpstreamFailed {
                pid,
                ts,
                fd,
                syscall,
                errno,
                peer,
            } => Event::UpstreamFailed {
                pid: *pid,
                ts: *ts,
                fd: *fd,
                syscall: *syscall,
                errno: *errno,
                peer: self.target(FdKind::Socket, peer).into(),
            },
            Event::UpstreamEnded {
                pid,
                ts,
                fd,
                ended,
                duration_ns,
                peer,
            } => Event::UpstreamEnded {
                pid: *pid,
                ts: *ts,
                fd: *fd,
                ended: *ended,
                duration_ns: *duration_ns,
                peer: self.target(FdKind::Socket, peer).into(),
            },
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stable_and_hide_the_input() {
        let r = Redactor::new();
        let a = r.target(FdKind::File, "/home/alice/secret.db");
        assert_eq!(a, r.target(FdKind::File, "/home/alice/secret.db"));
        assert!(a.starts_with("path-") && !a.contains("alice"), "{a}");
        assert_ne!(a, r.target(FdKind::File, "/home/bob/secret.db"));
        assert!(
            r.target(FdKind::Socket, "10.1.2.3:443")
                .starts_with("peer-")
        );
        assert_eq!(r.target(FdKind::Socket, "inet stream"), "inet stream");
        assert_eq!(r.target(FdKind::Pipe, "pipe"), "pipe");
        let exe = r.path("/home/alice/bin/server");
        assert!(exe.ends_with("/server") && !exe.contains("alice"), "{exe}");
        let argv = r.argv(&["/usr/bin/app".into(), "--token=hunter2".into()]);
        assert!(!argv[1].contains("hunter2"));
        let cgroup = Container::Cgroup("/user.slice/user-1000.slice/session-3.scope".into());
        let hidden = r.container(Some(&Arc::new(cgroup))).unwrap();
        let Container::Cgroup(path) = hidden.as_ref() else {
            panic!("{hidden:?}");
        };
        assert!(
            path.starts_with("/dir-")
                && path.ends_with("/session-3.scope")
                && !path.contains("1000"),
            "{path}"
        );
        let id = Arc::new(Container::Id("3f2a".repeat(16)));
        assert_eq!(r.container(Some(&id)), Some(id));
        // Another file, another key.
        assert_ne!(
            a,
            Redactor::new().target(FdKind::File, "/home/alice/secret.db")
        );
    }
}
