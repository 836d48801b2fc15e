//! Which container a process runs in, from its cgroup path (DESIGN.md "Additions": the
//! `container` of each process).
//!
//! Container runtimes name the cgroup of each container after its id, so the path says which
//! container a process is in without asking the runtime. Pure parsing: [`crate::procfs`] reads
//! the files.

use serde::{Deserialize, Serialize};

use crate::model::Pid;

/// Hex digits in a container id (docker, podman, containerd and cri-o all use 64).
const ID_LEN: usize = 64;
/// Hex digits shown of an id, as `docker ps` shows them.
const SHORT_ID_LEN: usize = 12;

/// Prefixes runtimes give a container's cgroup (systemd driver: `<prefix><id>.scope`).
/// `libpod-conmon-<id>` and `crio-conmon-<id>` hold the runtime's monitor, not the container:
/// what follows their prefix is not hex, so they never match.
const SCOPE_PREFIXES: [&str; 4] = ["docker-", "libpod-", "cri-containerd-", "crio-"];

/// Where a process is contained.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Container {
    /// A runtime's container id, in full.
    Id(String),
    /// The cgroup path of a process in a pid namespace of its own whose path has no id
    /// (`unshare --pid`, systemd-nspawn, a runtime not listed here).
    Cgroup(String),
}

impl Container {
    /// The full id or the path, as the JSON report shows it.
    pub fn as_str(&self) -> &str {
        match self {
            Container::Id(s) | Container::Cgroup(s) => s,
        }
    }
}

/// `container 3f2a9c1b7d4e` (the id shortened as `docker ps` does) or `cgroup /path`, from
/// what [`Container::as_str`] gives: a cgroup path starts with `/`, an id never does.
pub fn describe(shown: &str) -> String {
    if shown.starts_with('/') {
        format!("cgroup {shown}")
    } else {
        format!("container {}", shown.get(..SHORT_ID_LEN).unwrap_or(shown))
    }
}

/// Where a process runs, for text views: `pid 7 in container 3f2a9c1b7d4e`,
/// `in container 3f2a9c1b7d4e` (same pid as on the host, as with `docker run --pid=host`),
/// `pid 7 in its own pid namespace`; `None` for a host process, so that its lines stay as
/// they were.
pub fn placement(pid: Pid, ns_pid: Pid, container: Option<&str>) -> Option<String> {
    match (ns_pid != pid, container) {
        (true, Some(c)) => Some(format!("pid {ns_pid} in {}", describe(c))),
        (false, Some(c)) => Some(format!("in {}", describe(c))),
        (true, None) => Some(format!("pid {ns_pid} in its own pid namespace")),
        (false, None) => None,
    }
}

/// The container of a process whose /proc/PID/cgroup reads `cgroup`; `own_pid_namespace`
/// when it is in another pid namespace than the host's init. The cgroup v2 line (`0::/path`)
/// is tried first, then the v1 lines in order: the first path with an id wins. Without one,
/// a process in a pid namespace of its own is contained by its cgroup: the first path in
/// that order below the root (a hybrid host leaves the v2 path at `/`); a host process is
/// not contained.
pub fn from_cgroup_file(cgroup: &str, own_pid_namespace: bool) -> Option<Container> {
    let paths = cgroup_paths(cgroup);
    if let Some(id) = paths.iter().find_map(|p| id_in_path(p)) {
        return Some(Container::Id(id.to_string()));
    }
    if !own_pid_namespace {
        return None;
    }
    let path = paths.iter().find(|p| **p != "/").or(paths.first())?;
    Some(Container::Cgroup((*path).to_string()))
}

/// The paths of a /proc/PID/cgroup file, the v2 one first. Lines that are not
/// `hierarchy:controllers:path` are skipped.
fn cgroup_paths(cgroup: &str) -> Vec<&str> {
    let mut v2 = None;
    let mut v1 = Vec::new();
    for line in cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        if hierarchy == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else {
            v1.push(path);
        }
    }
    v2.into_iter().chain(v1).collect()
}

/// The container id a cgroup path names, looking from the innermost component out: a process
/// can sit in a cgroup below its container's (systemd inside a container puts it in
/// `.../docker-<id>.scope/init.scope`).
pub fn id_in_path(path: &str) -> Option<&str> {
    path.rsplit('/').find_map(id_in_component)
}

/// `<id>` (cgroupfs driver: `/docker/<id>`, `/kubepods/burstable/pod<uid>/<id>`),
/// `<prefix><id>.scope` (systemd driver; podman's cgroupfs `libpod-<id>` has no suffix), or
/// containerd's `kubepods-…-pod<uid>.slice:cri-containerd:<id>`.
fn id_in_component(component: &str) -> Option<&str> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    if is_id(name) {
        return Some(name);
    }
    if let Some(id) = SCOPE_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .filter(|id| is_id(id))
    {
        return Some(id);
    }
    let (runtime, id) = name.rsplit_once(':')?;
    let runtime = runtime.rsplit(':').next()?;
    (["cri-containerd", "docker", "crio"].contains(&runtime) && is_id(id)).then_some(id)
}

/// 64 lowercase hex digits: what every runtime listed here uses, and long enough that no
/// other cgroup name (a slice, a service, a 32-digit session id) passes for one.
fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";
    const POD: &str = "0b5e8c2a-7d14-4f2b-9a61-3c8e5d7f9a12";

    fn v2(path: &str) -> String {
        format!("0::{path}\n")
    }

    fn id_of(cgroup: &str) -> Option<Container> {
        from_cgroup_file(cgroup, true)
    }

    #[test]
    fn runtimes_cgroup_paths_name_the_container() {
        for path in [
            // docker, systemd driver (cgroup v2) and cgroupfs driver.
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            // podman: systemd driver, rootless under the user's slice, cgroupfs driver.
            format!("/machine.slice/libpod-{ID}.scope"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
            format!("/libpod_parent/libpod-{ID}"),
            // containerd (CRI) and cri-o with the systemd driver.
            format!("/system.slice/cri-containerd-{ID}.scope"),
            format!("/machine.slice/crio-{ID}.scope"),
            // Kubernetes pods: systemd driver, its containerd colon form, cgroupfs driver.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
                POD.replace('-', "_")
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{ID}.scope",
                POD.replace('-', "_")
            ),
            format!(
                "/system.slice/containerd.service/kubepods-burstable-pod{}.slice:cri-containerd:{ID}",
                POD.replace('-', "_")
            ),
            format!("/kubepods/burstable/pod{POD}/{ID}"),
            format!("/kubepods/pod{POD}/{ID}"),
            // systemd running inside a container moves itself below the container's cgroup.
            format!("/system.slice/docker-{ID}.scope/init.scope"),
        ] {
            assert_eq!(id_of(&v2(&path)), Some(Container::Id(ID.into())), "{path}");
            // Found the same way in a host process (`docker run --pid=host`).
            assert_eq!(
                from_cgroup_file(&v2(&path), false),
                Some(Container::Id(ID.into())),
                "{path}"
            );
        }
    }

    #[test]
    fn runtime_monitors_are_not_containers() {
        for path in [
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/machine.slice/crio-conmon-{ID}.scope"),
            "/system.slice/docker.service".to_string(),
            "/system.slice/containerd.service".to_string(),
            format!(
                "/kubepods.slice/kubepods-pod{}.slice",
                POD.replace('-', "_")
            ),
        ] {
            assert_eq!(from_cgroup_file(&v2(&path), false), None, "{path}");
        }
    }

    #[test]
    fn v1_lines_give_the_first_path_with_an_id() {
        let cgroup = format!(
            "12:hugetlb:/\n\
             11:memory:/user.slice/user-1000.slice\n\
             4:pids:/docker/{ID}\n\
             3:cpu,cpuacct:/docker/{ID}\n\
             1:name=systemd:/docker/{ID}\n\
             0::/\n"
        );
        assert_eq!(id_of(&cgroup), Some(Container::Id(ID.into())));
        // A hybrid host's v2 line wins when it names the container.
        let other = ID.replace('3', "4");
        let hybrid =
            format!("1:name=systemd:/docker/{other}\n0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(id_of(&hybrid), Some(Container::Id(ID.into())));
    }

    #[test]
    fn without_an_id_only_another_pid_namespace_is_contained() {
        // This machine's own shell: a 32-digit memory cgroup is no container id.
        let host =
            "9:name=systemd:/\n4:memory:/process_api/4abc90483ca5f6f7b7e2fa740d6167f9\n0::/\n";
        assert_eq!(from_cgroup_file(host, false), None);
        let session = v2("/user.slice/user-1000.slice/session-3.scope");
        assert_eq!(from_cgroup_file(&session, false), None);
        // `unshare --pid --fork` stays in the shell's cgroup, but not in its pid namespace.
        assert_eq!(
            from_cgroup_file(&session, true),
            Some(Container::Cgroup(
                "/user.slice/user-1000.slice/session-3.scope".into()
            ))
        );
        // A hybrid host's v2 path at the root says nothing: the first v1 path below it.
        assert_eq!(
            from_cgroup_file(host, true),
            Some(Container::Cgroup(
                "/process_api/4abc90483ca5f6f7b7e2fa740d6167f9".into()
            ))
        );
        assert_eq!(
            from_cgroup_file("4:memory:/machine/nspawn-web\n1:name=systemd:/x\n", true),
            Some(Container::Cgroup("/machine/nspawn-web".into()))
        );
        assert_eq!(
            from_cgroup_file("0::/\n", true),
            Some(Container::Cgroup("/".into()))
        );
        // Unreadable or junk: nothing to go by.
        for junk in ["", "garbage", "0::relative\n", "no:path\n"] {
            assert_eq!(from_cgroup_file(junk, true), None, "{junk:?}");
        }
    }

    #[test]
    fn ids_must_be_whole_lowercase_hex() {
        assert_eq!(id_in_path(&format!("/docker/{}", &ID[1..])), None);
        assert_eq!(id_in_path(&format!("/docker/{ID}0")), None);
        assert_eq!(id_in_path(&format!("/docker/{}", ID.to_uppercase())), None);
        assert_eq!(
            id_in_path(&format!("/system.slice/docker-{ID}.service")),
            None
        );
        assert_eq!(
            id_in_path(&format!("/system.slice/podman-{ID}.scope")),
            None
        );
        assert_eq!(id_in_path("/"), None);
    }

    #[test]
    fn text_views_shorten_ids_and_name_paths() {
        assert_eq!(describe(ID), "container 3f2a9c1b7d4e");
        assert_eq!(describe("/machine/web"), "cgroup /machine/web");
        assert_eq!(describe("abc"), "container abc");
        assert_eq!(
            placement(4242, 7, Some(ID)).as_deref(),
            Some("pid 7 in container 3f2a9c1b7d4e")
        );
        assert_eq!(
            placement(4242, 4242, Some(ID)).as_deref(),
            Some("in container 3f2a9c1b7d4e")
        );
        assert_eq!(
            placement(4242, 1, Some("/user.slice/x.scope")).as_deref(),
            Some("pid 1 in cgroup /user.slice/x.scope")
        );
        assert_eq!(
            placement(4242, 1, None).as_deref(),
            Some("pid 1 in its own pid namespace")
        );
        assert_eq!(placement(4242, 4242, None), None);
    }
}
