//! Cgroup path → container attribution: a pure parser, no I/O.
//!
//! Input is the path of a cgroup relative to the cgroup root, as found in
//! `/proc/<pid>/cgroup` (`0::/kubepods.slice/...`) or by walking the
//! hierarchy. Both cgroup v2 and v1 (hybrid hosts) paths work: the layout
//! below the root is the same. Understood layouts:
//!
//! - kubelet, systemd driver: `kubepods[-besteffort|-burstable]-pod<uid>.slice`
//!   with `_` for `-` in the uid (turned back into dashes);
//! - kubelet, cgroupfs driver: `kubepods/[besteffort|burstable/]pod<uid>/<id>`
//!   (Guaranteed pods have no QoS level);
//! - runtimes: containerd `cri-containerd-<id>.scope`, CRI-O `crio-<id>.scope`
//!   (`crio-conmon-<id>.scope` is the monitor, not the container), docker
//!   `docker-<id>.scope` and cgroupfs `/docker/<id>`.
//!
//! Attribute keys (decided here, documented in docs/metrics.md when the family
//! lands): `container.id` (64 lowercase hex) and `k8s.pod.uid` only when
//! found; `perch.k8s.qos_class` for the kubelet QoS class; `perch.cgroup` always, holding
//! the trimmed path: for a container its full path, for a host process its
//! path cut to `host_depth` components (`system.slice/sshd.service`), `/` for
//! the root.

/// The kubelet QoS class of a pod, from its cgroup parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// No QoS level in the path (`kubepods-pod<uid>`, `kubepods/pod<uid>`).
    Guaranteed,
    /// `burstable`.
    Burstable,
    /// `besteffort`.
    BestEffort,
}

impl Qos {
    /// The value of the `perch.k8s.qos_class` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "guaranteed",
            Qos::Burstable => "burstable",
            Qos::BestEffort => "besteffort",
        }
    }
}

/// The container runtime that named the cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope`, or a bare id under a cgroupfs pod.
    Containerd,
    /// `crio-<id>.scope`.
    Crio,
    /// `docker-<id>.scope`, `/docker/<id>`.
    Docker,
    /// A bare 64-hex id below a kubelet pod (cgroupfs driver): runtime unknown.
    Unknown,
}

/// What a cgroup path says about who runs in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    /// `container.id`: 64 lowercase hex characters, when the path names one.
    pub container_id: Option<String>,
    /// The runtime that named the container cgroup.
    pub runtime: Option<Runtime>,
    /// `k8s.pod.uid`, dashed, when below a kubelet pod cgroup.
    pub pod_uid: Option<String>,
    /// The QoS class, when below a kubelet pod cgroup.
    pub qos: Option<Qos>,
    /// `perch.cgroup`: the trimmed path (see the module header).
    pub cgroup: String,
}

/// Longest path accepted (bytes). Real kubelet paths are about 200 bytes;
/// `PATH_MAX` bounds what the kernel can show.
pub const MAX_PATH_BYTES: usize = 4096;
/// Most path components accepted.
pub const MAX_COMPONENTS: usize = 64;

/// Why a path was not attributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Longer than [`MAX_PATH_BYTES`] or deeper than [`MAX_COMPONENTS`].
    TooLong(usize),
    /// Does not start with `/`, or holds a `..`, NUL or newline component.
    Malformed,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::TooLong(n) => write!(f, "cgroup path too long ({n})"),
            PathError::Malformed => f.write_str("malformed cgroup path"),
        }
    }
}

impl std::error::Error for PathError {}

fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A pod uid as the kubelet writes it: a dashed UUID (8-4-4-4-12 hex), or on
/// static pods a 32-hex config hash. `_` already turned into `-`.
fn is_uid(s: &str) -> bool {
    let hex = |p: &str| p.bytes().all(|b| b.is_ascii_hexdigit());
    if s.len() == 32 {
        return hex(s);
    }
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| hex(p))
}

/// A runtime-named container component, or `None`.
fn container(component: &str, in_pod: bool) -> Option<(Runtime, String)> {
    let scoped = |prefix: &str| {
        component
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".scope"))
            .filter(|id| is_id(id))
            .map(str::to_owned)
    };
    if let Some(id) = scoped("cri-containerd-") {
        return Some((Runtime::Containerd, id));
    }
    // `crio-conmon-<id>` does not match: "conmon-<id>" is not 64 hex.
    if let Some(id) = scoped("crio-") {
        return Some((Runtime::Crio, id));
    }
    if let Some(id) = scoped("docker-") {
        return Some((Runtime::Docker, id));
    }
    if in_pod && is_id(component) {
        return Some((Runtime::Unknown, component.to_owned()));
    }
    None
}

/// A kubelet pod component: systemd `kubepods[-qos]-pod<uid>.slice` or
/// cgroupfs `pod<uid>` (QoS from the parent component).
fn pod(component: &str, parent: Option<&str>) -> Option<(Qos, String)> {
    if let Some(rest) = component.strip_suffix(".slice") {
        let (qos, uid) = if let Some(u) = rest.strip_prefix("kubepods-besteffort-pod") {
            (Qos::BestEffort, u)
        } else if let Some(u) = rest.strip_prefix("kubepods-burstable-pod") {
            (Qos::Burstable, u)
        } else if let Some(u) = rest.strip_prefix("kubepods-pod") {
            (Qos::Guaranteed, u)
        } else {
            return None;
        };
        let uid = uid.replace('_', "-");
        return is_uid(&uid).then_some((qos, uid));
    }
    let uid = component.strip_prefix("pod")?;
    let qos = match parent? {
        "kubepods" => Qos::Guaranteed,
        "burstable" => Qos::Burstable,
        "besteffort" => Qos::BestEffort,
        _ => return None,
    };
    is_uid(uid).then(|| (qos, uid.to_owned()))
}

/// Attributes a cgroup path. `host_depth` is how many components a path
/// outside any container keeps in `perch.cgroup` (1: `system.slice`, 2:
/// `system.slice/sshd.service`).
pub fn parse_cgroup_path(path: &str, host_depth: usize) -> Result<Attribution, PathError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(path.len()));
    }
    let rest = path.strip_prefix('/').ok_or(PathError::Malformed)?;
    let comps: Vec<&str> = rest.split('/').filter(|c| !c.is_empty()).collect();
    if comps.len() > MAX_COMPONENTS {
        return Err(PathError::TooLong(comps.len()));
    }
    if comps
        .iter()
        .any(|c| *c == ".." || *c == "." || c.contains(['\0', '\n']))
    {
        return Err(PathError::Malformed);
    }
    let mut out = Attribution {
        container_id: None,
        runtime: None,
        pod_uid: None,
        qos: None,
        cgroup: String::new(),
    };
    let mut end = None;
    for (i, c) in comps.iter().enumerate() {
        if out.pod_uid.is_none() {
            let parent = i.checked_sub(1).map(|p| comps[p]);
            if let Some((qos, uid)) = pod(c, parent) {
                out.qos = Some(qos);
                out.pod_uid = Some(uid);
                continue;
            }
        }
        let docker_parent = i > 0 && comps[i - 1] == "docker";
        if let Some((rt, id)) = container(c, out.pod_uid.is_some() || docker_parent) {
            out.runtime = Some(if docker_parent { Runtime::Docker } else { rt });
            out.container_id = Some(id);
            end = Some(i + 1);
            break;
        }
    }
    // A container keeps its path down to the container component (a nested
    // cgroup inside it is the same container); the host is cut to host_depth.
    let keep = match (end, out.pod_uid.is_some()) {
        (Some(e), _) => e,
        (None, true) => comps.len(),
        (None, false) => comps.len().min(host_depth),
    };
    out.cgroup = format!("/{}", comps[..keep].join("/"));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1b3c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
    const UID: &str = "1234abcd-5678-90ef-1234-567890abcdef";

    struct Case {
        path: String,
        id: Option<&'static str>,
        runtime: Option<Runtime>,
        uid: Option<&'static str>,
        qos: Option<Qos>,
        cgroup: String,
    }

    fn case(
        path: String,
        id: bool,
        runtime: Option<Runtime>,
        uid: bool,
        qos: Option<Qos>,
        cgroup: &str,
    ) -> Case {
        Case {
            path,
            id: id.then_some(ID),
            runtime,
            uid: uid.then_some(UID),
            qos,
            cgroup: cgroup
                .replace("{uidu}", &UID.replace('-', "_"))
                .replace("{uid}", UID)
                .replace("{id}", ID),
        }
    }

    #[test]
    fn table() {
        let u_ = UID.replace('-', "_");
        let sysd_burst =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice");
        let cases = [
            // containerd, systemd driver, burstable
            case(
                format!("{sysd_burst}/cri-containerd-{ID}.scope"),
                true,
                Some(Runtime::Containerd),
                true,
                Some(Qos::Burstable),
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uidu}.slice/cri-containerd-{id}.scope",
            ),
            // a cgroup nested inside the container (cgroup v2 "init" leaf) is the same container
            case(
                format!("{sysd_burst}/cri-containerd-{ID}.scope/init"),
                true,
                Some(Runtime::Containerd),
                true,
                Some(Qos::Burstable),
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uidu}.slice/cri-containerd-{id}.scope",
            ),
            // CRI-O, systemd driver, besteffort
            case(
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u_}.slice/crio-{ID}.scope"),
                true,
                Some(Runtime::Crio),
                true,
                Some(Qos::BestEffort),
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uidu}.slice/crio-{id}.scope",
            ),
            // CRI-O conmon: the pod, not a container
            case(
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u_}.slice/crio-conmon-{ID}.scope"),
                false,
                None,
                true,
                Some(Qos::BestEffort),
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uidu}.slice/crio-conmon-{id}.scope",
            ),
            // guaranteed, systemd driver: no QoS level
            case(
                format!("/kubepods.slice/kubepods-pod{u_}.slice/cri-containerd-{ID}.scope"),
                true,
                Some(Runtime::Containerd),
                true,
                Some(Qos::Guaranteed),
                "/kubepods.slice/kubepods-pod{uidu}.slice/cri-containerd-{id}.scope",
            ),
            // cgroupfs driver, burstable, bare id
            case(
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                true,
                Some(Runtime::Unknown),
                true,
                Some(Qos::Burstable),
                "/kubepods/burstable/pod{uid}/{id}",
            ),
            // cgroupfs driver, guaranteed
            case(
                format!("/kubepods/pod{UID}/{ID}"),
                true,
                Some(Runtime::Unknown),
                true,
                Some(Qos::Guaranteed),
                "/kubepods/pod{uid}/{id}",
            ),
            // cgroupfs besteffort pod cgroup itself (the pause/sandbox level)
            case(
                format!("/kubepods/besteffort/pod{UID}"),
                false,
                None,
                true,
                Some(Qos::BestEffort),
                "/kubepods/besteffort/pod{uid}",
            ),
            // docker, systemd driver
            case(
                format!("/system.slice/docker-{ID}.scope"),
                true,
                Some(Runtime::Docker),
                false,
                None,
                "/system.slice/docker-{id}.scope",
            ),
            // docker, cgroupfs driver
            case(format!("/docker/{ID}"), true, Some(Runtime::Docker), false, None, "/docker/{id}"),
            // host service, cut to depth 2
            case("/system.slice/sshd.service".into(), false, None, false, None, "/system.slice/sshd.service"),
            case(
                "/user.slice/user-1000.slice/session-3.scope".into(),
                false,
                None,
                false,
                None,
                "/user.slice/user-1000.slice",
            ),
            case("/".into(), false, None, false, None, "/"),
            case("".replace("", "/"), false, None, false, None, "/"),
            // a bare 64-hex id outside a pod or docker is not a container
            case(format!("/foo/{ID}"), false, None, false, None, "/foo/{id}"),
            // garbage and near misses
            case(format!("/system.slice/docker-{}.scope", &ID[..63]), false, None, false, None, &format!("/system.slice/docker-{}.scope", &ID[..63])),
        ];
        for c in cases {
            let a = parse_cgroup_path(&c.path, 2).unwrap_or_else(|e| panic!("{}: {e}", c.path));
            assert_eq!(a.container_id.as_deref(), c.id, "{}", c.path);
            assert_eq!(a.runtime, c.runtime, "{}", c.path);
            assert_eq!(a.pod_uid.as_deref(), c.uid, "{}", c.path);
            assert_eq!(a.qos, c.qos, "{}", c.path);
            assert_eq!(a.cgroup, c.cgroup, "{}", c.path);
        }
    }

    #[test]
    fn rejects_bad_ids_and_uids() {
        let upper = ID.to_uppercase();
        let nonhex = format!("{}g", &ID[..63]);
        let long = format!("{ID}0");
        for id in [upper.as_str(), nonhex.as_str(), long.as_str(), &ID[..12]] {
            let a = parse_cgroup_path(&format!("/system.slice/docker-{id}.scope"), 2).unwrap();
            assert_eq!(a.container_id, None, "{id}");
        }
        // truncated uid
        let a = parse_cgroup_path("/kubepods.slice/kubepods-pod1234abcd_5678.slice", 2).unwrap();
        assert_eq!(a.pod_uid, None);
        // non-hex uid
        let a = parse_cgroup_path(
            "/kubepods.slice/kubepods-podzzzzabcd_5678_90ef_1234_567890abcdef.slice",
            2,
        )
        .unwrap();
        assert_eq!(a.pod_uid, None);
        // cgroupfs pod under an unknown parent
        let a = parse_cgroup_path(&format!("/other/pod{UID}/{ID}"), 2).unwrap();
        assert_eq!((a.pod_uid, a.container_id), (None, None));
    }

    #[test]
    fn rejects_malformed_paths() {
        assert_eq!(
            parse_cgroup_path("system.slice", 2),
            Err(PathError::Malformed)
        );
        assert_eq!(parse_cgroup_path("/a/../b", 2), Err(PathError::Malformed));
        assert_eq!(parse_cgroup_path("/a\0b", 2), Err(PathError::Malformed));
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert!(matches!(
            parse_cgroup_path(&long, 2),
            Err(PathError::TooLong(_))
        ));
        let deep = "/a".repeat(MAX_COMPONENTS + 1);
        assert!(matches!(
            parse_cgroup_path(&deep, 2),
            Err(PathError::TooLong(_))
        ));
        // truncated mid-component still parses, attributes nothing
        let a =
            parse_cgroup_path("/kubepods.slice/kubepods-burstable.slice/kubepods-burs", 2).unwrap();
        assert_eq!((a.pod_uid, a.container_id), (None, None));
    }
}
