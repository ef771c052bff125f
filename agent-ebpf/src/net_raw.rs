//! The packet-socket guard's reading side: what an agent was doing when the kernel checked its
//! CAP_NET_RAW. No cgroup hook sees AF_PACKET (sock_create runs from inet_create only), and BPF
//! LSM programs need BPF trampolines, which not every kernel has. Every packet socket (and
//! AF_XDP and raw inet socket) needs CAP_NET_RAW, so the guard runs on the capability check
//! itself (tracepoint cap_capable, Linux 6.13+): only where a capability is checked, not on
//! every syscall, and for io_uring's socket creation too. decide.rs judges.

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    programs::BtfTracePointContext,
};

use agent_common::{counter, CapGuardLayout};

use crate::{
    decide::{self, FailedClosed, NetRawUse},
    maps::count,
};

/// Load-time constant: syscall numbers and kernel struct offsets, from the controller (which
/// reads them from the kernel's BTF). All zero, as built: the guard is off.
#[unsafe(no_mangle)]
static CAP_GUARD_LAYOUT: CapGuardLayout = CapGuardLayout {
    enabled: 0,
    nr_socket: 0,
    nr_compat_socket: 0,
    nr_compat_socketcall: 0,
    nr_io_uring_enter: 0,
    regs_nr: 0,
    regs_args: [0; 3],
    regs_compat_args: [0; 3],
    task_flags: 0,
    pf_io_worker: 0,
    task_status: 0,
    status_compat: 0,
};

const CAP_NET_RAW: i32 = 13;
/// socketcall(2)'s call number for socket().
const SYS_SOCKET: u64 = 1;
/// Bits of a socket type argument that are the type (the rest are SOCK_NONBLOCK/CLOEXEC).
const SOCK_TYPE_MASK: u32 = 0xf;

/// tp_btf/cap_capable(cred, target_ns, capable_ns, cap, ret): `ret == 0` when granted.
/// `Err`: what the agent was doing could not be read, and was judged as the strictest kind.
pub fn cap_check(ctx: &BtfTracePointContext) -> Result<(), FailedClosed> {
    let cap: i32 = ctx.arg(3);
    if cap != CAP_NET_RAW {
        return Ok(());
    }
    // SAFETY: read of a load-time constant.
    let l = unsafe { core::ptr::read_volatile(&CAP_GUARD_LAYOUT) };
    if l.enabled == 0 {
        return Ok(());
    }
    let mut caller = decide::Caller::new();
    if !decide::find_agent(&mut caller) {
        return Ok(());
    }
    let granted = ctx.arg::<i32>(4) == 0;
    let what = classify(&l).unwrap_or(NetRawUse::Unknown);
    decide::net_raw_use(&caller, what, granted)
}

/// What the current task is doing, from its flags and the registers saved at syscall entry.
#[inline(always)]
fn classify(l: &CapGuardLayout) -> Result<NetRawUse, i32> {
    // SAFETY: plain helper calls; the task pointer is the kernel's own, typed.
    let (task, regs) = unsafe {
        let task = bpf_get_current_task_btf();
        (task as u64, bpf_task_pt_regs(task) as u64)
    };
    if read_kernel::<u32>(task, l.task_flags)? & l.pf_io_worker != 0 {
        return Ok(NetRawUse::IoUring);
    }
    let nr = read_kernel::<u64>(regs, l.regs_nr)?;
    if nr == l.nr_io_uring_enter as u64 {
        return Ok(NetRawUse::IoUring);
    }
    let compat = read_kernel::<u32>(task, l.task_status)? & l.status_compat != 0;
    let arg = |i: usize| -> Result<u32, i32> {
        let off = if compat {
            l.regs_compat_args[i]
        } else {
            l.regs_args[i]
        };
        Ok(read_kernel::<u64>(regs, off)? as u32)
    };
    if (!compat && nr == l.nr_socket as u64) || (compat && nr == l.nr_compat_socket as u64) {
        return Ok(NetRawUse::Socket {
            family: arg(0)?,
            ty: arg(1)? & SOCK_TYPE_MASK,
            protocol: arg(2)?,
            trusted: true,
        });
    }
    if compat && nr == l.nr_compat_socketcall as u64 && arg(0)? as u64 == SYS_SOCKET {
        let block = arg(1)? as u64;
        // SAFETY: the helper reads user memory and fails instead of faulting.
        let a = unsafe { bpf_probe_read_user(block as *const [u32; 3]) }.unwrap_or([0; 3]);
        return Ok(NetRawUse::Socket {
            family: a[0],
            ty: a[1] & SOCK_TYPE_MASK,
            protocol: a[2],
            trusted: false,
        });
    }
    Ok(NetRawUse::Other)
}

/// A `T` at `base + off` in kernel memory; counts an error when it cannot be read.
#[inline(always)]
fn read_kernel<T>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: the helper reads kernel memory and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
        .inspect_err(|_| count(counter::ERRORS))
}
