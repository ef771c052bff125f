//! `agentwall exec`: run a command as an agent, contained. In order: check every argument,
//! register the cgroup with the controller, join it, take a cgroup namespace, drop to the
//! agent's user with only the capabilities its policy keeps, set no_new_privs, verify, execute.
//! Any failure before the last step ends here: the command never runs unregistered, outside
//! its cgroup, or with more than it was given. docs/exec.md explains each step.

use std::{
    ffi::{CStr, CString},
    os::unix::process::CommandExt,
    path::PathBuf,
};

use anyhow::{bail, ensure, Context, Result};
use caps::{CapSet, Capability, CapsHashSet};
use clap::Args;

use crate::{
    api,
    identity::{self, cgroup},
    policy,
};

#[derive(Args)]
pub(super) struct ExecArgs {
    /// Agent name: the cgroup <cgroup2>/<parent>/<NAME>.
    #[arg(long)]
    agent: String,
    /// Parent cgroup of agents, relative to the cgroup2 root (`a/b`: cgroup names, no `.`,
    /// `..` or empty component).
    #[arg(long, default_value = "agentwall")]
    cgroup_parent: String,
    /// Run the agent as USER[:GROUP] (names or numbers; GROUP defaults to USER's primary
    /// group). Supplementary groups are cleared.
    #[arg(long, default_value = "nobody")]
    user: String,
    /// Allow uid 0 or gid 0 for the agent. UNSAFE: root without capabilities still owns the
    /// pins in bpffs and other root files, so the agent can end enforcement for every agent.
    #[arg(long)]
    unsafe_root: bool,
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Who the agent runs as.
#[derive(Debug)]
struct Identity {
    uid: u32,
    gid: u32,
    /// From the passwd entry, when there is one: HOME, USER and LOGNAME for the agent.
    name: Option<String>,
    home: Option<String>,
}

/// Registers the agent's cgroup with the controller, joins it, drops everything the policy
/// does not keep, then becomes the command. If the controller does not confirm, or any step
/// fails, the command does not run: an agent never runs unenforced or uncontained.
pub(super) fn run(a: ExecArgs) -> Result<()> {
    if !identity::valid_agent_name(&a.agent) {
        bail!(
            "agent name {:?} must be one cgroup name: letters, digits, '-', '_', '.'",
            a.agent
        );
    }
    check_cgroup_parent(&a.cgroup_parent)?;
    let who = resolve_user(&a.user)?;
    if (who.uid == 0 || who.gid == 0) && !a.unsafe_root {
        bail!(
            "--user {:?} is uid {} gid {}: an agent with uid or gid 0 can remove agentwall's \
             pins and end enforcement for every agent; use a non-root user, or pass \
             --unsafe-root to accept that",
            a.user,
            who.uid,
            who.gid
        );
    }

    let root = cgroup::cgroup2_mount()?;
    let path = root.join(&a.cgroup_parent).join(&a.agent);
    let existed = path.is_dir();
    cgroup::create(&path)?;
    let remove_new = || {
        if !existed {
            let _ = std::fs::remove_dir(&path);
        }
    };
    // The components are plain names, so this holds unless the mount itself moved; checked
    // on the real path all the same, before anything is registered.
    let inside = path
        .canonicalize()
        .ok()
        .zip(root.canonicalize().ok())
        .is_some_and(|(p, r)| p.starts_with(&r) && p != r);
    if !inside {
        remove_new();
        bail!(
            "--cgroup-parent {:?}: {} is not below the cgroup2 mount {}",
            a.cgroup_parent,
            path.display(),
            root.display()
        );
    }
    let reply = match api::client::call(
        &a.control_socket,
        api::client::Method::POST,
        "/v1/agents",
        Some(serde_json::json!({ "cgroup": path })),
    ) {
        Ok(r) => r,
        Err(e) => {
            remove_new();
            return Err(e).with_context(|| format!("registering agent {:?}", a.agent));
        }
    };
    tracing::debug!(?reply, "registered");
    let kept = kept_capabilities(&reply)?;

    cgroup::move_pid(&path, std::process::id())?;
    // The agent sees its own cgroup as the root, and the kernel refuses it a move to any
    // cgroup outside that subtree, whatever the file permissions say.
    // SAFETY: plain syscall with a constant flag.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        bail!(
            "entering a new cgroup namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    contain(&who, &kept).context("dropping the agent's privileges")?;

    let mut cmd = std::process::Command::new(&a.command[0]);
    cmd.args(&a.command[1..]);
    if who.uid != 0 {
        if let (Some(name), Some(home)) = (&who.name, &who.home) {
            cmd.env("HOME", home).env("USER", name).env("LOGNAME", name);
        }
    }
    let err = cmd.exec();
    bail!("executing {:?}: {err}", a.command[0])
}

/// `--cgroup-parent`: relative to the cgroup2 root, each component a cgroup name as agent names
/// are (no `.`, `..` or empty component, so nothing can point outside the mount).
fn check_cgroup_parent(parent: &str) -> Result<()> {
    ensure!(
        !parent.starts_with('/'),
        "--cgroup-parent {parent:?} must be relative to the cgroup2 root (e.g. agentwall or \
         team/agents), not absolute"
    );
    for c in parent.split('/') {
        ensure!(
            identity::valid_agent_name(c),
            "--cgroup-parent {parent:?}: component {c:?} is not a cgroup name (letters, digits, \
             '-', '_', '.'; no empty, '.' or '..' component)"
        );
    }
    Ok(())
}

/// `USER[:GROUP]`, each a name or a number.
fn resolve_user(spec: &str) -> Result<Identity> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    ensure!(!user.is_empty(), "--user {spec:?}: no user");
    let entry = passwd(user).with_context(|| format!("--user {spec:?}"))?;
    let (uid, primary, name, home) = match (entry, user.parse::<u32>()) {
        (Some(e), _) => (e.0, Some(e.1), Some(e.2), Some(e.3)),
        (None, Ok(uid)) => (uid, None, None, None),
        (None, Err(_)) => bail!("--user {spec:?}: no such user"),
    };
    let gid = match group {
        Some(g) => match group_id(g).with_context(|| format!("--user {spec:?}"))? {
            Some(gid) => gid,
            None => g
                .parse()
                .ok()
                .with_context(|| format!("--user {spec:?}: no such group {g:?}"))?,
        },
        None => primary.with_context(|| {
            format!(
                "--user {spec:?}: uid {uid} has no passwd entry; give the group too ({uid}:GID)"
            )
        })?,
    };
    Ok(Identity {
        uid,
        gid,
        name,
        home,
    })
}

/// Buffer for the reentrant passwd and group lookups (larger than any sane entry).
const LOOKUP_BUF: usize = 64 << 10;

/// The passwd entry of a user name or uid: (uid, gid, name, home).
fn passwd(user: &str) -> Result<Option<(u32, u32, String, String)>> {
    // SAFETY: an all-zero passwd is a valid out-parameter.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    let rc = match user.parse::<u32>() {
        // SAFETY: valid out-parameters and a buffer of the given length.
        Ok(uid) => unsafe {
            libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found)
        },
        Err(_) => {
            let c = CString::new(user).context("user name contains a NUL")?;
            // SAFETY: as above, with a NUL-terminated name.
            unsafe {
                libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found)
            }
        }
    };
    ensure!(
        rc == 0,
        "looking up user {user:?}: {}",
        std::io::Error::from_raw_os_error(rc)
    );
    if found.is_null() {
        return Ok(None);
    }
    // SAFETY: on success the strings point into `buf`, NUL-terminated.
    let text = |p: *const libc::c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    Ok(Some((
        pw.pw_uid,
        pw.pw_gid,
        text(pw.pw_name),
        text(pw.pw_dir),
    )))
}

/// The gid of a group name (None when there is no such group; numbers are not looked up).
fn group_id(group: &str) -> Result<Option<u32>> {
    if group.parse::<u32>().is_ok() {
        return Ok(None);
    }
    let c = CString::new(group).context("group name contains a NUL")?;
    // SAFETY: an all-zero group is a valid out-parameter.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    // SAFETY: valid out-parameters and a buffer of the given length.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) };
    ensure!(
        rc == 0,
        "looking up group {group:?}: {}",
        std::io::Error::from_raw_os_error(rc)
    );
    Ok((!found.is_null()).then_some(gr.gr_gid))
}

/// The capabilities the controller's reply says the agent's policy keeps. A field that is there
/// but unreadable, or a name this build does not know, fails: never more than was granted.
fn kept_capabilities(reply: &serde_json::Value) -> Result<CapsHashSet> {
    let names = |key: &str| -> Result<Vec<String>> {
        reply
            .get(key)
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
            .with_context(|| format!("the controller's reply has an unreadable {key:?}"))
            .map(Option::unwrap_or_default)
    };
    let mut kept = CapsHashSet::new();
    for n in names("capabilities")? {
        kept.insert(
            policy::capability(&n)
                .with_context(|| format!("the controller asks to keep unknown capability {n:?}"))?,
        );
    }
    // A controller from before `capabilities`: raw and packet sockets need CAP_NET_RAW.
    if names("sockets")?
        .iter()
        .any(|s| s == "raw" || s == "packet")
    {
        kept.insert(Capability::CAP_NET_RAW);
    }
    Ok(kept)
}

// securebits (linux/securebits.h); not in the libc crate.
/// uid 0 gains no capabilities on execve.
const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
/// Permitted capabilities survive the setuid away from root (effective ones do not).
const SECBIT_KEEP_CAPS: libc::c_ulong = 1 << 4;

/// Becomes `who` with exactly `kept` in the permitted, effective, inheritable, ambient and
/// bounding sets, no supplementary groups, and no_new_privs; then checks that this is so.
/// Per thread: this process is single-threaded and executes the command from this thread.
fn contain(who: &Identity, kept: &CapsHashSet) -> Result<()> {
    // While still root: the bounding set (needs CAP_SETPCAP), so no execve can give back what
    // is dropped here, even to uid 0.
    for cap in bounding_set()? {
        if !kept.iter().any(|k| u32::from(k.index()) == cap) {
            // SAFETY: plain prctl.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                bail!(
                    "dropping capability {cap} from the bounding set: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    let mut bits = SECBIT_NOROOT | SECBIT_NOROOT_LOCKED;
    if !kept.is_empty() {
        bits |= SECBIT_KEEP_CAPS;
    }
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) } != 0 {
        bail!("setting securebits: {}", std::io::Error::last_os_error());
    }
    // Groups before the gid, the gid before the uid: each needs the privilege the next drops.
    // SAFETY: plain syscalls with scalar arguments (an empty group list).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            bail!(
                "clearing supplementary groups: {}",
                std::io::Error::last_os_error()
            );
        }
        if libc::setresgid(who.gid, who.gid, who.gid) != 0 {
            bail!(
                "setting gid {}: {}",
                who.gid,
                std::io::Error::last_os_error()
            );
        }
        if libc::setresuid(who.uid, who.uid, who.uid) != 0 {
            bail!(
                "setting uid {}: {}",
                who.uid,
                std::io::Error::last_os_error()
            );
        }
    }
    // Effective first: it must stay within permitted at every step.
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        caps::set(None, set, kept).with_context(|| format!("setting the {set:?} set"))?;
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient set")?;
    // Ambient: what a non-root uid keeps across execve.
    for cap in kept {
        caps::raise(None, CapSet::Ambient, *cap)
            .with_context(|| format!("raising {cap} in the ambient set"))?;
    }
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!("setting no_new_privs: {}", std::io::Error::last_os_error());
    }
    verify(who, kept)
}

/// Indexes of the capabilities in this thread's bounding set (up to the kernel's last one).
fn bounding_set() -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for cap in 0..64u32 {
        // SAFETY: plain prctl.
        match unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } {
            1 => out.push(cap),
            0 => {}
            // EINVAL: past the kernel's last capability.
            _ if cap > 0 => break,
            _ => bail!(
                "reading the bounding set: {}",
                std::io::Error::last_os_error()
            ),
        }
    }
    Ok(out)
}

/// Reads back what `contain` set: a kernel or library that silently ignored a step fails here.
fn verify(who: &Identity, kept: &CapsHashSet) -> Result<()> {
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        let have = caps::read(None, set).with_context(|| format!("reading the {set:?} set"))?;
        ensure!(
            &have == kept,
            "the {set:?} set is {have:?}, expected {kept:?}"
        );
    }
    let mut bounding = bounding_set()?;
    let mut want: Vec<u32> = kept.iter().map(|c| u32::from(c.index())).collect();
    bounding.sort_unstable();
    want.sort_unstable();
    ensure!(
        bounding == want,
        "the bounding set is {bounding:?}, expected {want:?}"
    );
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: valid out-parameters.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    ensure!(
        [r, e, s] == [who.uid; 3],
        "uids are {r}/{e}/{s}, expected {}",
        who.uid
    );
    // SAFETY: as above.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    ensure!(
        [r, e, s] == [who.gid; 3],
        "gids are {r}/{e}/{s}, expected {}",
        who.gid
    );
    // SAFETY: a zero-size query.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    ensure!(groups == 0, "{groups} supplementary groups remain");
    // SAFETY: plain prctl.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    ensure!(nnp == 1, "no_new_privs is not set");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parent_is_relative_and_plain() {
        for ok in ["agentwall", "team/agents", "agentwall-test-1-2", "a.b/c_d"] {
            check_cgroup_parent(ok).unwrap();
        }
        for bad in [
            "",
            "/agentwall",
            "../x",
            "agentwall/..",
            "a/../../b",
            "a//b",
            "a/./b",
            ".",
            "agentwall/",
            "a/b c",
        ] {
            let e = check_cgroup_parent(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn users_resolve_by_name_and_number() {
        let nobody = resolve_user("nobody").unwrap();
        assert_ne!(nobody.uid, 0);
        assert_eq!(nobody.name.as_deref(), Some("nobody"));
        let by_number = resolve_user(&format!("{}:{}", nobody.uid, nobody.gid)).unwrap();
        assert_eq!((by_number.uid, by_number.gid), (nobody.uid, nobody.gid));
        assert_eq!(resolve_user("root").unwrap().uid, 0);
        assert!(resolve_user("no-such-user-agentwall").is_err());
        assert!(resolve_user("nobody:no-such-group-agentwall").is_err());
        // A uid without a passwd entry needs its group.
        assert!(resolve_user("4000000000").is_err());
        assert_eq!(
            resolve_user("4000000000:4000000000").unwrap().gid,
            4_000_000_000
        );
    }

    #[test]
    fn a_policy_keeps_named_capabilities_and_net_raw_for_its_sockets() {
        let parse = |extra: &str| {
            policy::parse_policy(
                std::path::Path::new("p.yaml"),
                &format!("name: p\nagents:\n  cgroups: [a/b]\negress: []\n{extra}"),
            )
        };
        let p = parse("capabilities: [ipc_lock, ipc_lock]\nsockets: [packet]\n").unwrap();
        assert_eq!(p.kept_capabilities(), ["ipc_lock", "net_raw"]);
        assert!(parse("").unwrap().kept_capabilities().is_empty());
        let e = parse("capabilities: [dac_override]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.yaml:5:") && e.contains("\"dac_override\" cannot be kept"),
            "{e}"
        );
    }

    #[test]
    fn kept_capabilities_come_from_the_reply() {
        let kept =
            kept_capabilities(&serde_json::json!({"capabilities": ["net_bind_service"]})).unwrap();
        assert_eq!(
            kept,
            [Capability::CAP_NET_BIND_SERVICE].into_iter().collect()
        );
        let kept = kept_capabilities(&serde_json::json!({"sockets": ["packet"]})).unwrap();
        assert_eq!(kept, [Capability::CAP_NET_RAW].into_iter().collect());
        assert!(kept_capabilities(&serde_json::json!({}))
            .unwrap()
            .is_empty());
        assert!(kept_capabilities(&serde_json::json!({"capabilities": ["sys_admin"]})).is_err());
        assert!(kept_capabilities(&serde_json::json!({"capabilities": "net_raw"})).is_err());
    }
}
