//! The socket-syscall guard's reading side: which socket(2) call just returned, and what it
//! created or asked for. No cgroup hook sees AF_PACKET, vsock, XDP and other non-inet sockets,
//! and BPF LSM programs need BPF trampolines (not every kernel has them), so the guard watches
//! socket(2) return on the sys_exit tracepoint; decide.rs judges it.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user, generated::bpf_get_current_task},
    programs::BtfTracePointContext,
};

use agent_common::{counter, SyscallLayout};

use crate::{decide, maps::count};

/// Load-time constant: syscall numbers and kernel struct offsets, from the controller (which
/// reads them from the kernel's BTF). All zero, as built: the guard is off.
#[unsafe(no_mangle)]
static SYSCALL_LAYOUT: SyscallLayout = SyscallLayout {
    enabled: 0,
    nr_socket: 0,
    nr_compat_socket: 0,
    nr_compat_socketcall: 0,
    regs_nr: 0,
    regs_args: [0; 3],
    regs_compat_args: [0; 3],
    task_status: 0,
    status_compat: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_type: 0,
    sk_protocol: 0,
};

const EPERM: i64 = 1;
const EACCES: i64 = 13;
/// socketcall(2)'s call number for socket().
const SYS_SOCKET: u64 = 1;
/// Bits of a socket type argument that are the type (the rest are SOCK_NONBLOCK/CLOEXEC).
const SOCK_TYPE_MASK: u32 = 0xf;

/// tp_btf/sys_exit: runs as every syscall of every task returns, so the first test (is this
/// socket(2)?) is the cheap one.
pub fn socket_exit(ctx: &BtfTracePointContext) -> Result<(), i32> {
    // SAFETY: read of a load-time constant.
    let l = unsafe { core::ptr::read_volatile(&SYSCALL_LAYOUT) };
    if l.enabled == 0 {
        return Ok(());
    }
    // sys_exit(struct pt_regs *regs, long ret)
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let nr = read_kernel::<u64>(regs, l.regs_nr)?;
    let compat = if nr == l.nr_socket as u64 {
        false
    } else if nr == l.nr_compat_socket as u64 || nr == l.nr_compat_socketcall as u64 {
        if !in_compat_syscall(&l)? {
            return Ok(());
        }
        true
    } else {
        return Ok(());
    };
    // Refusals other than a permission check are not decisions (no such family, no memory).
    if ret < 0 && ret != -EPERM && ret != -EACCES {
        return Ok(());
    }
    let args = if compat {
        l.regs_compat_args
    } else {
        l.regs_args
    };
    if compat
        && nr == l.nr_compat_socketcall as u64
        && read_kernel::<u64>(regs, args[0])? as u32 as u64 != SYS_SOCKET
    {
        return Ok(());
    }
    let Some(agent) = decide::find_agent() else {
        return Ok(());
    };
    let what = if ret >= 0 {
        // What was made, read from the kernel's socket: the arguments may have been changed
        // since the kernel read them (socketcall's are in user memory).
        created(&l, ret as u64)
    } else {
        requested(regs, args, compat && nr == l.nr_compat_socketcall as u64)
    };
    decide::socket_call(agent, what, ret >= 0)
}

/// Whether the current syscall is a 32-bit one (TS_COMPAT in thread_info.status).
#[inline(always)]
fn in_compat_syscall(l: &SyscallLayout) -> Result<bool, i32> {
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    Ok(read_kernel::<u32>(task, l.task_status)? & l.status_compat != 0)
}

/// (family, type, protocol) of the socket behind descriptor `fd` of the current task; `None`
/// when it cannot be read.
#[inline(always)]
fn created(l: &SyscallLayout, fd: u64) -> Option<(u32, u32, u32)> {
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let files = read_kernel::<u64>(task, l.task_files).ok()?;
    let fdt = read_kernel::<u64>(files, l.files_fdt).ok()?;
    if fd >= read_kernel::<u32>(fdt, l.fdt_max_fds).ok()? as u64 {
        return None;
    }
    let fds = read_kernel::<u64>(fdt, l.fdt_fd).ok()?;
    let file = read_kernel::<u64>(fds + fd * 8, 0).ok()?;
    let sock = read_kernel::<u64>(file, l.file_private_data).ok()?;
    let sk = read_kernel::<u64>(sock, l.socket_sk).ok()?;
    Some((
        read_kernel::<u16>(sk, l.sk_family).ok()? as u32,
        read_kernel::<u16>(sk, l.sk_type).ok()? as u32,
        read_kernel::<u16>(sk, l.sk_protocol).ok()? as u32,
    ))
}

/// (family, type, protocol) the caller asked for: the saved argument registers, or for
/// socketcall the argument block in user memory.
#[inline(always)]
fn requested(regs: u64, args: [u32; 3], socketcall: bool) -> Option<(u32, u32, u32)> {
    let a = if socketcall {
        let block = read_kernel::<u64>(regs, args[1]).ok()?;
        // SAFETY: the helper reads user memory and fails instead of faulting.
        let v = unsafe { bpf_probe_read_user(block as *const [u32; 3]) }.ok()?;
        (v[0], v[1], v[2])
    } else {
        (
            read_kernel::<u64>(regs, args[0]).ok()? as u32,
            read_kernel::<u64>(regs, args[1]).ok()? as u32,
            read_kernel::<u64>(regs, args[2]).ok()? as u32,
        )
    };
    Some((a.0, a.1 & SOCK_TYPE_MASK, a.2))
}

/// A `T` at `base + off` in kernel memory; counts an error when it cannot be read.
#[inline(always)]
fn read_kernel<T>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: the helper reads kernel memory and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
        .inspect_err(|_| count(counter::ERRORS))
}
