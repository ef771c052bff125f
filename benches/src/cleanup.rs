//! Everything the bench creates outside its own memory is registered here, so it is removed on
//! every way out: the normal end, an error, a panic (a guard in `run`), SIGINT/SIGTERM/SIGHUP.
//! Only what this process created is touched: its child processes (by pid, never by name), its
//! nftables table, its cgroups (unique prefix agentwall-bench-<pid>) and its temp directory.

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

#[derive(Default)]
struct Registry {
    /// Children not yet waited for: their pids cannot be reused, so killing them is safe.
    children: Vec<u32>,
    nft_tables: Vec<String>,
    /// Deepest first when removed.
    cgroups: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    children: Vec::new(),
    nft_tables: Vec::new(),
    cgroups: Vec::new(),
    dirs: Vec::new(),
});

static ABORTING: AtomicBool = AtomicBool::new(false);

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g)
}

pub fn aborting() -> bool {
    ABORTING.load(Ordering::SeqCst)
}

pub fn add_child(pid: u32) {
    with(|r| r.children.push(pid));
}

pub fn forget_child(pid: u32) {
    with(|r| r.children.retain(|&p| p != pid));
}

pub fn add_nft_table(name: &str) {
    with(|r| r.nft_tables.push(name.to_string()));
}

/// Deletes the table now; it stays registered when the delete fails.
pub fn delete_nft_table(name: &str) -> anyhow::Result<()> {
    let out = Command::new("nft")
        .args(["delete", "table", "inet", name])
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "nft delete table inet {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    with(|r| r.nft_tables.retain(|t| t != name));
    Ok(())
}

pub fn add_cgroup(p: PathBuf) {
    with(|r| r.cgroups.push(p));
}

pub fn add_dir(p: PathBuf) {
    with(|r| r.dirs.push(p));
}

/// Removes everything still registered. Idempotent; errors are printed, not returned.
pub fn run_all() {
    let reg = with(std::mem::take);
    for pid in &reg.children {
        // SAFETY: plain syscall on a pid we spawned and have not reaped.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    for pid in &reg.children {
        let mut status = 0;
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(*pid as i32, &mut status, 0) };
    }
    for t in &reg.nft_tables {
        match Command::new("nft")
            .args(["delete", "table", "inet", t])
            .output()
        {
            Ok(o) if o.status.success() => {}
            // Already gone (an `nft -f` that failed creates nothing).
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No such file") => {}
            Ok(o) => eprintln!(
                "agentwall-bench: cleanup: nft delete table inet {t}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("agentwall-bench: cleanup: running nft: {e}"),
        }
    }
    let mut cgroups = reg.cgroups.clone();
    cgroups.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for cg in &cgroups {
        // A cgroup is removable once its last process has exited; give them a moment.
        let mut ok = false;
        for _ in 0..50 {
            if !cg.exists() || std::fs::remove_dir(cg).is_ok() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !ok {
            eprintln!(
                "agentwall-bench: cleanup: cannot remove cgroup {}",
                cg.display()
            );
        }
    }
    for d in &reg.dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Calls [`run_all`] when dropped (a panic unwinding through `run` included).
pub struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        run_all();
    }
}

/// On SIGINT, SIGTERM or SIGHUP: clean up and exit 130.
pub fn install_signal_handlers() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
            _ = hup.recv() => {},
        }
        ABORTING.store(true, Ordering::SeqCst);
        eprintln!("agentwall-bench: interrupted, cleaning up");
        run_all();
        std::process::exit(130);
    });
    Ok(())
}
