//! `agentwall exec` contains the agent: it runs as `nobody` with no capability in any set, an
//! empty bounding set and no_new_privs, in its own cgroup namespace. From inside, it cannot
//! leave its cgroup, remove agentwall's pins, run `agentwall uninstall`, reach the programs
//! or signal the controller; enforcement stays on. `--cgroup-parent` cannot point outside the
//! cgroup2 mount, and uid 0 needs an explicit unsafe flag. A policy's `capabilities:` are kept
//! (ambient, for the non-root user) and nothing else.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use agentwall_tests::{
    sibling_exe, tcp_server, unix_server_pid, Daemon, Outcome, TestCgroups, EPERM,
};
use anyhow::{ensure, Context, Result};

const EACCES: i32 = libc::EACCES;
const CAP_NET_RAW: i64 = 1 << 13;

fn policy(base: &str, name: &str, port: u16, extra: &str) -> String {
    format!(
        "name: {name}\nagents:\n  cgroups: [{base}/{name}]\negress:\n  - cidr: 127.0.0.1/32\n    \
         ports: [{port}]\n    protocol: tcp\n{extra}"
    )
}

/// `agentwall exec` with extra flags before `--`; returns (exit ok, outcomes, stderr).
fn exec(
    d: &Daemon,
    parent: &str,
    agent: &str,
    flags: &[&str],
    steps: &[String],
) -> Result<(bool, Vec<Outcome>, String)> {
    let out = Command::new(&d.agentwall)
        .args(["exec", "--agent", agent, "--cgroup-parent", parent])
        .arg("--control-socket")
        .arg(&d.socket)
        .args(flags)
        .arg("--")
        .arg(sibling_exe("probe")?)
        .args(steps)
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    let outcomes = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Outcome>, _>>()
        .with_context(|| format!("probe output: {stdout}"))?;
    Ok((
        out.status.success(),
        outcomes,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Some pinned file under `dir` (a map or a link).
fn some_pin(dir: &Path) -> Option<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let t = e.file_type().ok()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if !e.file_name().to_string_lossy().starts_with('.') {
                return Some(e.path());
            }
        }
    }
    None
}

fn nobody() -> Result<(u32, u32)> {
    // SAFETY: a static NUL-terminated name; the result is read at once.
    let pw = unsafe { libc::getpwnam(c"nobody".as_ptr()) };
    ensure!(!pw.is_null(), "this system has no user nobody");
    // SAFETY: non-null passwd entry.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn values(out: &[Outcome]) -> Vec<i64> {
    out.iter().map(|o| o.value).collect()
}

#[test]
fn an_exec_agent_cannot_escape_or_end_enforcement() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("contain")?;
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let (a, b) = (addr.port(), addr.port() ^ 1);
    d.write_policy("jail.yaml", &policy(&cg.base, "jail", a, ""))?;
    d.start()?;
    let allowed = format!("tcp:{addr}");
    let denied = format!("tcp:127.0.0.1:{b}");
    let pin = some_pin(&d.pin_dir).context("the daemon pinned nothing")?;
    let controller = unix_server_pid(&d.socket)?;
    let (uid, gid) = nobody()?;
    let root_procs = cg.root.join("cgroup.procs");
    let base_procs = cg.root.join(&cg.base).join("cgroup.procs");
    let pin_dir = d.pin_dir.display().to_string();

    // What the agent holds: nobody, no capability anywhere, no groups, no_new_privs.
    let fields = [
        "CapEff",
        "CapPrm",
        "CapInh",
        "CapAmb",
        "CapBnd",
        "Uid",
        "Gid",
        "Groups",
        "NoNewPrivs",
    ];
    let steps: Vec<String> = fields.iter().map(|f| format!("capmask:{f}")).collect();
    let (ok, out, err) = exec(&d, &cg.base, "jail", &[], &steps)?;
    ensure!(ok, "exec failed: {err}");
    assert_eq!(
        values(&out),
        [0, 0, 0, 0, 0, uid as i64, gid as i64, 0, 1],
        "{fields:?}: {out:?}"
    );

    let a = agentwall_tests::sibling_exe("agentwall")?
        .display()
        .to_string();
    let steps = vec![
        format!("write:{},0", root_procs.display()),
        format!("write:{},0", base_procs.display()),
        denied.clone(),
        format!("unlink:{}", pin.display()),
        format!("run:{a},uninstall,--pin-dir,{pin_dir}"),
        format!("run:{a},uninstall,--pin-dir,{pin_dir},--force"),
        format!("kill:{controller},{}", libc::SIGKILL),
        "bpf-next-prog".into(),
        denied.clone(),
        allowed.clone(),
    ];
    let (ok, out, err) = exec(&d, &cg.base, "jail", &[], &steps)?;
    ensure!(ok, "exec failed: {err}");
    ensure!(out.len() == steps.len(), "probe output: {out:?}");
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    // The `run` steps report the command's failure (errno -1) with its output.
    assert_eq!(
        errnos,
        [EACCES, EACCES, EPERM, EACCES, -1, -1, EPERM, EPERM, EPERM, 0],
        "{out:#?}"
    );
    assert!(
        out[5].detail.contains("ermission denied"),
        "uninstall --force from inside failed for another reason: {:?}",
        out[5]
    );

    // Nothing changed: the pins are there, the controller answers, a new agent is enforced.
    assert!(pin.exists(), "{} was removed", pin.display());
    let (ok, msg) = d.cli(&["status"])?;
    ensure!(ok, "the controller does not answer: {msg}");
    assert_eq!(unix_server_pid(&d.socket)?, controller);
    let (ok, out, err) = exec(&d, &cg.base, "jail", &[], &[denied.clone(), allowed])?;
    ensure!(ok, "exec failed: {err}");
    assert_eq!((out[0].errno, out[1].errno), (EPERM, 0), "{out:?}");
    Ok(())
}

#[test]
fn exec_refuses_escaping_cgroup_parents_and_root() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("contain-args")?;
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    d.write_policy("jail.yaml", &policy(&cg.base, "jail", addr.port(), ""))?;
    d.start()?;
    let step = vec![format!("tcp:{addr}")];
    let root = cg.root.display().to_string();
    for parent in [
        "../x".to_string(),
        format!("{}/../../x", cg.base),
        format!("{root}/{}", cg.base),
        "/agentwall".into(),
        format!("{}/./x", cg.base),
        format!("{}//x", cg.base),
        format!("{}/", cg.base),
        String::new(),
    ] {
        let (ok, out, err) = exec(&d, &parent, "jail", &[], &step)?;
        assert!(
            !ok && out.is_empty(),
            "--cgroup-parent {parent:?} ran: {out:?}"
        );
        assert!(
            err.contains(&format!("--cgroup-parent {parent:?}")),
            "the error does not name {parent:?}: {err}"
        );
    }
    assert!(
        !cg.root.parent().unwrap().join("x").exists() && !cg.root.join("x").exists(),
        "a refused --cgroup-parent created a cgroup"
    );

    // uid 0 (and gid 0) only with the flag that says it is unsafe.
    for user in ["root", "0", "nobody:root", "nobody:0"] {
        let (ok, out, err) = exec(&d, &cg.base, "jail", &["--user", user], &step)?;
        assert!(!ok && out.is_empty(), "--user {user} ran: {out:?}");
        assert!(err.contains("--unsafe-root"), "{user}: {err}");
    }
    let (ok, out, err) = exec(&d, &cg.base, "jail", &["--user", "no-such-user-aw"], &step)?;
    assert!(!ok && out.is_empty(), "an unknown user ran: {out:?}");
    assert!(err.contains("no such user"), "{err}");

    // Even as uid 0, the agent has no capability. Its cgroup namespace stops a move out of its
    // cgroup only where cgroup2 is mounted with nsdelegate; elsewhere root's file permissions
    // let it leave, and its connects are no longer judged: why uid 0 needs the unsafe flag.
    let nsdelegate = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.contains(" - cgroup2 ") && l.contains("nsdelegate"));
    let steps = vec![
        "capmask:CapEff".into(),
        "capmask:CapBnd".into(),
        "capmask:Uid".into(),
        format!("write:{root}/cgroup.procs,0"),
        format!("tcp:127.0.0.1:{}", addr.port() ^ 1),
    ];
    let (ok, out, err) = exec(
        &d,
        &cg.base,
        "jail",
        &["--user", "root", "--unsafe-root"],
        &steps,
    )?;
    ensure!(ok, "exec --unsafe-root failed: {err}");
    assert_eq!(values(&out[..3]), [0, 0, 0], "{out:?}");
    let want = if nsdelegate {
        (libc::ENOENT, EPERM)
    } else {
        (0, libc::ECONNREFUSED)
    };
    assert_eq!(
        (out[3].errno, out[4].errno),
        want,
        "nsdelegate {nsdelegate}: {out:?}"
    );

    // A user and group given by number.
    let (uid, gid) = nobody()?;
    let id = format!("{uid}:{gid}");
    let (ok, out, err) = exec(
        &d,
        &cg.base,
        "jail",
        &["--user", &id],
        &["capmask:Uid".into(), "capmask:Gid".into()],
    )?;
    ensure!(ok, "exec --user {id}: {err}");
    assert_eq!(values(&out), [uid as i64, gid as i64]);
    Ok(())
}

#[test]
fn a_policy_keeps_only_the_capabilities_it_names() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("contain-caps")?;
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let p = addr.port();
    d.write_policy(
        "rawcap.yaml",
        &policy(
            &cg.base,
            "rawcap",
            p,
            "capabilities: [net_raw, net_bind_service]\nsockets: [raw]\n",
        ),
    )?;
    d.write_policy("plain.yaml", &policy(&cg.base, "plain", p, ""))?;
    d.start()?;
    let steps: Vec<String> = vec![
        "capmask:CapEff".into(),
        "capmask:CapPrm".into(),
        "capmask:CapAmb".into(),
        "capmask:CapBnd".into(),
        "capmask:Uid".into(),
        // socket(AF_INET, SOCK_RAW, IPPROTO_UDP): needs CAP_NET_RAW.
        "sock:2,3,17".into(),
    ];
    let kept = CAP_NET_RAW | 1 << 10; // CAP_NET_BIND_SERVICE
    let (uid, _) = nobody()?;
    let (ok, out, err) = exec(&d, &cg.base, "rawcap", &[], &steps)?;
    ensure!(ok, "exec failed: {err}");
    assert_eq!(
        values(&out[..5]),
        [kept, kept, kept, kept, uid as i64],
        "{out:?}"
    );
    assert_eq!(out[5].errno, 0, "a kept CAP_NET_RAW did not work: {out:?}");

    let (ok, out, err) = exec(&d, &cg.base, "plain", &[], &steps)?;
    ensure!(ok, "exec failed: {err}");
    assert_eq!(values(&out[..5]), [0, 0, 0, 0, uid as i64], "{out:?}");
    assert_eq!(
        out[5].errno, EPERM,
        "a raw socket without the capability: {out:?}"
    );

    // Any capability that could undo containment is refused where the policy is read.
    let dir = d.dir.join("bad-policies");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("admin.yaml"),
        policy(&cg.base, "admin", p, "capabilities: [sys_admin]\n"),
    )?;
    let out = Command::new(&d.agentwall)
        .args(["policy", "check"])
        .arg(&dir)
        .output()?;
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a policy keeping sys_admin passed");
    assert!(
        msg.contains("admin.yaml:") && msg.contains("\"sys_admin\" cannot be kept"),
        "{msg}"
    );
    Ok(())
}
