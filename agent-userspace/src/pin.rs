//! Pinned state in bpffs: what agentwall pins where, checking a pinned map before it is reused
//! (aya reuses a pinned map without checking its type or sizes), swapping the program behind a
//! pinned link in one step, and removing it all.
//!
//! Layout, under one versioned directory (bumped when a map's layout changes):
//! `<bpffs>/agentwall/v1/maps/<MAP>` and `<bpffs>/agentwall/v1/links/<PROGRAM>`.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use agent_common::{
    counter, AgentEntry, Config, PrefixV4, PrefixV6, RuleSet, EVENT_RING_BYTES, MAX_AGENTS,
    MAX_PREFIXES_V4, MAX_PREFIXES_V6,
};
use aya::maps::{MapInfo, MapType};
use thiserror::Error;

/// Version of the pinned layout; a controller never reuses maps pinned under another version.
pub const LAYOUT_VERSION: u32 = 1;

/// The default pin directory under a bpffs mount.
pub fn default_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("agentwall").join(format!("v{LAYOUT_VERSION}"))
}

/// What a pinned map must be to be reused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// Every map agentwall pins, as the programs define them.
pub fn expected_maps(ring_bytes: Option<u32>) -> [MapSpec; 6] {
    let s = |n: usize| n as u32;
    [
        MapSpec {
            name: "AW_CONFIG",
            map_type: MapType::Array,
            key_size: 4,
            value_size: s(size_of::<Config>()),
            max_entries: 1,
        },
        MapSpec {
            name: "AW_AGENTS",
            map_type: MapType::Hash,
            key_size: 8,
            value_size: s(size_of::<AgentEntry>()),
            max_entries: MAX_AGENTS,
        },
        MapSpec {
            name: "AW_RULES_V4",
            map_type: MapType::LpmTrie,
            key_size: s(4 + size_of::<PrefixV4>()),
            value_size: s(size_of::<RuleSet>()),
            max_entries: MAX_PREFIXES_V4,
        },
        MapSpec {
            name: "AW_RULES_V6",
            map_type: MapType::LpmTrie,
            key_size: s(4 + size_of::<PrefixV6>()),
            value_size: s(size_of::<RuleSet>()),
            max_entries: MAX_PREFIXES_V6,
        },
        MapSpec {
            name: "AW_EVENTS",
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: ring_bytes.unwrap_or(EVENT_RING_BYTES),
        },
        MapSpec {
            name: "AW_COUNTERS",
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: 8,
            max_entries: counter::COUNT,
        },
    ]
}

#[derive(Debug, Error)]
pub enum PinError {
    #[error("pinned map {path}: {reason}; refusing to reuse it (run `agentwall uninstall` to start over)")]
    Mismatch { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks every map already pinned in `dir` against what this controller expects. Missing
/// pins are fine (they are created); a pin of the wrong kind or size is an error.
pub fn check_maps(dir: &Path, ring_bytes: Option<u32>) -> Result<(), PinError> {
    for spec in expected_maps(ring_bytes) {
        let path = dir.join("maps").join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| PinError::Mismatch {
            path: path.clone(),
            reason: format!("cannot read its info: {e}"),
        })?;
        let found = (
            info.map_type()
                .map(|t| format!("{t:?}"))
                .unwrap_or_else(|_| "unknown".into()),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let want = (
            format!("{:?}", spec.map_type),
            spec.key_size,
            spec.value_size,
            spec.max_entries,
        );
        if found != want {
            return Err(PinError::Mismatch {
                path,
                reason: format!(
                    "found type {}, key {} B, value {} B, {} entries; expected {}, key {} B, \
                     value {} B, {} entries",
                    found.0, found.1, found.2, found.3, want.0, want.1, want.2, want.3
                ),
            });
        }
    }
    Ok(())
}

/// Whether programs are pinned (attached) in `dir`.
pub fn links_exist(dir: &Path, programs: &[&str]) -> bool {
    programs.iter().all(|p| dir.join("links").join(p).exists())
}

const BPF_OBJ_GET: libc::c_long = 7;
// enum bpf_cmd in include/uapi/linux/bpf.h.
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a repr(C) bpf_attr prefix for `cmd`, valid for its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> Result<OwnedFd, PinError> {
    let err = |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    };
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr).map_err(err)?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of the link pinned at `link` with `prog`, atomically (BPF_LINK_UPDATE):
/// there is no moment when the hook runs neither program.
pub fn link_update(link: &Path, prog: impl AsFd) -> Result<(), PinError> {
    let fd = obj_get(link)?;
    tracing::debug!(link = %link.display(), fd = fd.as_raw_fd(), "updating link");
    let mut attr = LinkUpdateAttr {
        link_fd: fd.as_raw_fd() as u32,
        new_prog_fd: prog.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map_err(|source| PinError::Io {
        path: link.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Removes everything pinned in `dir`: links first (that detaches the programs), then maps.
/// Returns what was removed.
pub fn uninstall(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|source| PinError::Io {
                path: p.clone(),
                source,
            })?;
            removed.push(p);
        }
        let _ = std::fs::remove_dir(&d);
    }
    let _ = std::fs::remove_dir(dir);
    if let Some(parent) = dir.parent() {
        // The `agentwall` directory goes too when no other layout version is left in it.
        let _ = std::fs::remove_dir(parent);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_dir_is_versioned() {
        assert_eq!(
            default_dir(Path::new("/sys/fs/bpf")),
            PathBuf::from("/sys/fs/bpf/agentwall/v1")
        );
    }

    #[test]
    fn expected_maps_match_the_shared_types() {
        let maps = expected_maps(None);
        let v4 = maps.iter().find(|m| m.name == "AW_RULES_V4").unwrap();
        assert_eq!((v4.key_size, v4.value_size), (12, 196));
        let v6 = maps.iter().find(|m| m.name == "AW_RULES_V6").unwrap();
        assert_eq!(v6.key_size, 24);
        assert_eq!(expected_maps(Some(4096))[4].max_entries, 4096);
    }
}
