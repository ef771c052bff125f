//! The program the exec workload runs: a minimal static ELF that only calls exit(0), written
//! by the bench. A dynamically linked /bin/true spends most of its time in the loader, which
//! would hide what the exec, fork and exit tracepoints add; this one costs the kernel's
//! fork, exec and exit and nothing else.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// Load address of the single segment.
const BASE: u64 = 0x40_0000;
const EHDR: usize = 64;
const PHDR: usize = 56;

/// exit(0) for this machine's architecture, with its ELF machine number.
fn exit0() -> Option<(u16, &'static [u8])> {
    match std::env::consts::ARCH {
        // xor edi, edi; mov eax, 60 (exit); syscall
        "x86_64" => Some((62, &[0x31, 0xff, 0xb8, 0x3c, 0, 0, 0, 0x0f, 0x05])),
        // mov x0, #0; mov x8, #93 (exit); svc #0
        "aarch64" => Some((
            183,
            &[
                0x00, 0x00, 0x80, 0xd2, 0xa8, 0x0b, 0x80, 0xd2, 0x01, 0x00, 0x00, 0xd4,
            ],
        )),
        _ => None,
    }
}

/// The ELF image: header, one read+execute PT_LOAD segment covering the file, the code.
fn image(machine: u16, code: &[u8]) -> Vec<u8> {
    let total = (EHDR + PHDR + code.len()) as u64;
    let mut v = Vec::with_capacity(total as usize);
    v.extend_from_slice(b"\x7fELF");
    v.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&machine.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&(BASE + (EHDR + PHDR) as u64).to_le_bytes()); // entry
    v.extend_from_slice(&(EHDR as u64).to_le_bytes()); // program headers
    v.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    v.extend_from_slice(&0u32.to_le_bytes());
    for h in [EHDR as u16, PHDR as u16, 1, 0, 0, 0] {
        v.extend_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    for q in [0, BASE, BASE, total, total, 0x1000] {
        v.extend_from_slice(&q.to_le_bytes());
    }
    v.extend_from_slice(code);
    v
}

/// Writes the program into `dir` and returns its path; on an architecture it has no code for,
/// returns /bin/true (dynamically linked: a higher floor, so a smaller ratio to see) and says so.
pub fn write(dir: &Path) -> Result<PathBuf> {
    let Some((machine, code)) = exit0() else {
        eprintln!(
            "agentwall-bench: no static exit(0) program for {}: the exec workload runs \
             /bin/true (dynamically linked) instead",
            std::env::consts::ARCH
        );
        return Ok(PathBuf::from("/bin/true"));
    };
    let path = dir.join("exit0");
    std::fs::write(&path, image(machine, code))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_one_segment_over_the_whole_file() {
        let img = image(62, &[0x90; 9]);
        assert_eq!(img.len(), EHDR + PHDR + 9);
        assert_eq!(&img[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(img[24..32].try_into().unwrap());
        assert_eq!(entry, BASE + 120);
        let filesz = u64::from_le_bytes(img[EHDR + 32..EHDR + 40].try_into().unwrap());
        assert_eq!(filesz, img.len() as u64);
    }
}
