//! Small system helpers: root check, CPU affinity, clocks, /proc figures, the machine line.

use std::{io, process::Command};

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub fn require_root() -> Result<()> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmarks load eBPF programs and nftables rules and create cgroups: they need \
             root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN); run `cargo xtask bench` as root"
        );
    }
    Ok(())
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("sched_getaffinity");
    }
    // SAFETY: CPU_ISSET only reads the set.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pins the calling thread (or, in a single-threaded process, the process) to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is valid.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CLOCK_MONOTONIC in ns (comparable between the processes of one machine).
pub use agentwall_tests::dns_load::mono_ns;

/// A `Vm*:` field of /proc/self/status, in KiB.
pub fn status_kib(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_status_kib(&text, field).with_context(|| format!("no {field} line in /proc/self/status"))
}

fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resets VmHWM (peak RSS) to the current RSS (Linux 4.0+).
pub fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM (/proc/self/clear_refs)")
}

/// CPU time (utime + stime + cutime + cstime, in seconds) of every user process on the machine
/// except this one and its children: what others burn while the bench runs. Reaped children's
/// time moves into their parent's cutime, so the sum stays meaningful as processes come and go.
pub fn foreign_cpu_s() -> f64 {
    let me = std::process::id();
    // SAFETY: plain getter.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ticks = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((ppid, flags, t)) = parse_stat(&stat) {
            const PF_KTHREAD: u64 = 0x0020_0000;
            if ppid == me || flags & PF_KTHREAD != 0 {
                continue;
            }
            ticks += t;
        }
    }
    ticks as f64 / hz
}

/// (ppid, flags, utime + stime + cutime + cstime) from a /proc/PID/stat line.
fn parse_stat(stat: &str) -> Option<(u32, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let cpu = num(14)? + num(15)? + num(16)? + num(17)?;
    Some((num(4)? as u32, num(9)?, cpu))
}

/// Time this process's threads spent on a CPU, in ns, leaving out the loopback servers'
/// threads: during a workload that is the in-process controller's work.
pub fn own_cpu_ns_except(skip: &[&str]) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            !skip.contains(&comm.trim())
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Where the bench runs, printed with every table.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub arch: String,
    pub cpus: usize,
    pub cpu_model: String,
    /// /proc/sys/net/core/bpf_jit_enable: 0 off, 1 on, 2 on with debug output.
    pub bpf_jit_enable: String,
    pub nft_version: String,
    pub tinyproxy_version: String,
}

impl Machine {
    pub fn probe() -> Machine {
        // SAFETY: uname fills the struct.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        unsafe { libc::uname(&mut u) };
        let field = |f: &[libc::c_char]| {
            let bytes: Vec<u8> = f
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let jit = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let version = |cmd: &str, arg: &str| {
            Command::new(cmd)
                .arg(arg)
                .output()
                .ok()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "missing".into())
        };
        Machine {
            kernel: field(&u.release),
            arch: field(&u.machine),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            bpf_jit_enable: jit,
            nft_version: version("nft", "--version"),
            tinyproxy_version: version("tinyproxy", "-v"),
        }
    }

    pub fn line(&self) -> String {
        let jit = match self.bpf_jit_enable.as_str() {
            "0" => "off",
            "1" => "on",
            "2" => "on (debug)",
            _ => "unknown",
        };
        format!(
            "Linux {} {}, {} CPUs ({}), BPF JIT {jit} (bpf_jit_enable={}); {}; {}",
            self.kernel,
            self.arch,
            self.cpus,
            self.cpu_model,
            self.bpf_jit_enable,
            self.nft_version,
            self.tinyproxy_version
        )
    }
}

/// Sets the CPU affinity of every thread of this process (threads made later inherit it).
pub fn pin_process(cpus: &[usize]) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus {
        // SAFETY: `c` is below CPU_SETSIZE (it came from the kernel's affinity mask).
        unsafe { libc::CPU_SET(*c, &mut set) };
    }
    for task in std::fs::read_dir("/proc/self/task")? {
        let Ok(tid) = task?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: a thread of this process and a valid set; a thread gone meanwhile is ESRCH.
        let rc = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
        let e = std::io::Error::last_os_error();
        if rc != 0 && e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e).with_context(|| format!("pinning thread {tid} to CPUs {cpus:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse() {
        let line = "123 (a (b) c) S 45 123 123 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 9";
        assert_eq!(parse_stat(line), Some((45, 4194560, 13)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_fields_parse() {
        let s = "Name:\tx\nVmHWM:\t   12345 kB\nVmRSS:\t    2345 kB\n";
        assert_eq!(parse_status_kib(s, "VmHWM"), Some(12345));
        assert_eq!(parse_status_kib(s, "VmRSS"), Some(2345));
        assert_eq!(parse_status_kib(s, "VmSwap"), None);
    }
}
