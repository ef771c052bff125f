//! The packet-socket guard's view of this kernel (`names::NET_RAW_PROGRAM` on tp_btf/cap_capable):
//! the syscall numbers of this architecture, and where the kernel keeps what the guard reads,
//! taken from the kernel's BTF.

use agent_common::CapGuardLayout;

use super::btf::{self, BtfError};

/// The layout for the running kernel; `enabled == 0` on an architecture the guard does not
/// know (it then never acts).
pub fn kernel_layout() -> Result<CapGuardLayout, BtfError> {
    let data = std::fs::read(btf::VMLINUX)
        .map_err(|e| BtfError::Read(btf::VMLINUX.into(), e.to_string()))?;
    layout_from(&data)
}

/// The layout from BTF data, for this build's architecture.
pub fn layout_from(btf_data: &[u8]) -> Result<CapGuardLayout, BtfError> {
    if !cfg!(target_arch = "x86_64") {
        return Ok(CapGuardLayout::default());
    }
    let off = |s: &str, m: &[&str]| btf::member_offsets(btf_data, s, m);
    // x86-64: native arguments in di, si, dx; 32-bit (int 0x80, sysenter) ones in bx, cx, dx.
    let regs = off("pt_regs", &["orig_ax", "di", "si", "dx", "bx", "cx"])?;
    let task = off("task_struct", &["thread_info", "flags"])?;
    let status = off("thread_info", &["status"])?[0];
    Ok(CapGuardLayout {
        enabled: 1,
        nr_socket: 41,
        nr_compat_socket: 359,
        nr_compat_socketcall: 102,
        nr_io_uring_enter: 426,
        regs_nr: regs[0],
        regs_args: [regs[1], regs[2], regs[3]],
        regs_compat_args: [regs[4], regs[5], regs[3]],
        task_flags: task[1],
        // PF_IO_WORKER (include/linux/sched.h).
        pf_io_worker: 0x0000_0010,
        task_status: task[0] + status,
        // TS_COMPAT (arch/x86/include/asm/thread_info.h): the syscall came in by a 32-bit entry.
        status_compat: 0x0002,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn reads_this_kernels_layout() {
        let data = std::fs::read(btf::VMLINUX).expect("this kernel's BTF (the guard needs it)");
        let l = layout_from(&data).expect("layout");
        assert_eq!(l.enabled, 1);
        // pt_regs' order is x86-64 ABI: bx before cx, dx, si, di, orig_ax.
        assert!(l.regs_compat_args[0] < l.regs_compat_args[1]);
        assert!(l.regs_args[2] < l.regs_args[1] && l.regs_args[1] < l.regs_args[0]);
        assert!(l.regs_args[0] < l.regs_nr);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn refuses_what_is_not_btf() {
        assert_eq!(layout_from(b"not btf"), Err(BtfError::Header));
    }
}
