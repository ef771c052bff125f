//! Pinned state in bpffs: what agentwall pins where, checking a pinned map before it is reused
//! (aya reuses a pinned map without checking its type or sizes), swapping the program behind a
//! pinned link in one step, and removing it all.
//!
//! Layout, under one versioned directory (bumped when the set of maps or programs, or a map's
//! layout, changes): `<bpffs>/agentwall/v7/maps/<MAP>` and `<bpffs>/agentwall/v7/links/<PROGRAM>`.
//! v1 had no Unix-socket programs and no AW_UNIX map; v2 had no packet-socket guard
//! (`net_raw_use`) and 8 bytes less per event (no `action`); v3 had no exec tracker
//! (`exec_track`, `fork_track`, `exit_track`, map AW_EXES), kept the dead-man heartbeat in
//! AW_CONFIG (AW_HEARTBEAT now), had 24-byte agent entries (no `kind`: 32 bytes now) and events
//! without the process fields (128 bytes, 648 now) in a 16 MiB ring; v4 had no grant tries
//! (AW_GRANTS_V4/V6) and 32-byte agent entries (no task slot); v5 had 40-byte agent entries (no
//! rate limit: 56 bytes now), no AW_RATE map and 648-byte events (no chain of agents: 680 now).
//! v6 had no DNS steering (AW_DNS_CONFIG, AW_DNS_SOCKS, recvmsg and getpeername programs) and
//! grant items without chain levels (`Grant::levels`).
//! A v7 controller migrates a v6 one like any older layout: its own maps, agents re-registered,
//! then each link switched in one step and the old ring drained.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use agent_common::{
    counter, names, AgentEntry, Config, DnsConfig, DnsSock, ExePath, GrantKeyV4, GrantKeyV6,
    GrantSet, PrefixV4, PrefixV6, RuleSet, UnixKey, UnixRule, EVENT_RING_BYTES, MAX_AGENTS,
    MAX_DNS_SOCKS, MAX_EXES, MAX_GRANT_PREFIXES, MAX_PREFIXES_V4, MAX_PREFIXES_V6, MAX_UNIX_PATHS,
};
use aya::maps::{MapInfo, MapType};
use thiserror::Error;

use super::sys;

/// Version of the pinned layout; a controller never reuses maps pinned under another version.
pub const LAYOUT_VERSION: u32 = 7;

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

/// Every map agentwall pins (`names::PINNED_MAPS`), as the programs define them.
pub fn expected_maps(ring_bytes: Option<u32>) -> [MapSpec; names::PINNED_MAPS.len()] {
    let s = |n: usize| n as u32;
    [
        MapSpec {
            name: names::CONFIG_MAP,
            map_type: MapType::Array,
            key_size: 4,
            value_size: s(size_of::<Config>()),
            max_entries: 1,
        },
        MapSpec {
            name: names::AGENTS_MAP,
            map_type: MapType::Hash,
            key_size: 8,
            value_size: s(size_of::<AgentEntry>()),
            max_entries: MAX_AGENTS,
        },
        MapSpec {
            name: names::RULES_V4_MAP,
            map_type: MapType::LpmTrie,
            key_size: s(4 + size_of::<PrefixV4>()),
            value_size: s(size_of::<RuleSet>()),
            max_entries: MAX_PREFIXES_V4,
        },
        MapSpec {
            name: names::RULES_V6_MAP,
            map_type: MapType::LpmTrie,
            key_size: s(4 + size_of::<PrefixV6>()),
            value_size: s(size_of::<RuleSet>()),
            max_entries: MAX_PREFIXES_V6,
        },
        MapSpec {
            name: names::UNIX_MAP,
            map_type: MapType::LpmTrie,
            key_size: s(4 + size_of::<UnixKey>()),
            value_size: s(size_of::<UnixRule>()),
            max_entries: MAX_UNIX_PATHS,
        },
        MapSpec {
            name: names::EVENTS_MAP,
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: ring_bytes.unwrap_or(EVENT_RING_BYTES),
        },
        MapSpec {
            name: names::COUNTERS_MAP,
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: 8,
            max_entries: counter::COUNT,
        },
        MapSpec {
            name: names::HEARTBEAT_MAP,
            map_type: MapType::Array,
            key_size: 4,
            value_size: 8,
            max_entries: 1,
        },
        MapSpec {
            name: names::EXES_MAP,
            map_type: MapType::Hash,
            key_size: 4,
            value_size: s(size_of::<ExePath>()),
            max_entries: MAX_EXES,
        },
        MapSpec {
            name: names::GRANTS_V4_MAP,
            map_type: MapType::LpmTrie,
            key_size: s(4 + size_of::<GrantKeyV4>()),
            value_size: s(size_of::<GrantSet>()),
            max_entries: MAX_GRANT_PREFIXES,
        },
        MapSpec {
            name: names::GRANTS_V6_MAP,
            map_type: MapType::LpmTrie,
            key_size: s(4 + size_of::<GrantKeyV6>()),
            value_size: s(size_of::<GrantSet>()),
            max_entries: MAX_GRANT_PREFIXES,
        },
        MapSpec {
            name: names::RATE_MAP,
            map_type: MapType::LruHash,
            key_size: s(size_of::<u64>()),
            value_size: s(size_of::<u64>()),
            max_entries: MAX_AGENTS,
        },
        MapSpec {
            name: names::DNS_CONFIG_MAP,
            map_type: MapType::Array,
            key_size: 4,
            value_size: s(size_of::<DnsConfig>()),
            max_entries: 1,
        },
        MapSpec {
            name: names::DNS_SOCKS_MAP,
            map_type: MapType::LruHash,
            key_size: s(size_of::<u64>()),
            value_size: s(size_of::<DnsSock>()),
            max_entries: MAX_DNS_SOCKS,
        },
    ]
}

/// The version of a layout directory named `v<N>`.
fn layout_version(dir: &Path) -> Option<u32> {
    dir.file_name()?.to_str()?.strip_prefix('v')?.parse().ok()
}

/// Older layouts pinned beside `dir` (siblings named `v<N>` with a lower N), to retire once this
/// controller's programs are attached. A newer layout there is an error: its controller is the
/// one to run (a downgrade would leave it enforcing beside this one).
pub fn older_layouts(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let (Some(own), Some(parent)) = (layout_version(dir), dir.parent()) else {
        return Ok(Vec::new());
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(Vec::new());
    };
    let mut older = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        match layout_version(&path) {
            Some(v) if v < own => older.push(path),
            Some(v) if v > own => {
                return Err(PinError::Newer {
                    path,
                    version: v,
                    own,
                })
            }
            _ => {}
        }
    }
    older.sort();
    Ok(older)
}

/// Pins the object pinned at `from` at `to` as well (a link moving to a new layout directory;
/// the old pin is removed when that layout is retired).
pub fn repin(from: &Path, to: &Path) -> Result<(), PinError> {
    let fd = obj_get(from)?;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|source| PinError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    sys::obj_pin(&fd, to).map_err(|source| PinError::Io {
        path: to.to_path_buf(),
        source,
    })
}

/// Every layout directory (`v<N>`) under `<bpffs>/agentwall`, oldest first.
pub fn all_layouts(bpffs: &Path) -> Vec<PathBuf> {
    let parent = default_dir(bpffs)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| layout_version(&e.path()).map(|v| (v, e.path())))
        .collect();
    dirs.sort();
    dirs.into_iter().map(|(_, p)| p).collect()
}

/// Removes the link pins of `dir`, which detaches its programs (nothing else holds them).
pub fn unpin_links(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    remove_pins(&dir.join("links"))
}

fn remove_pins(d: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(d) else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let p = e.path();
        std::fs::remove_file(&p).map_err(|source| PinError::Io {
            path: p.clone(),
            source,
        })?;
        removed.push(p);
    }
    let _ = std::fs::remove_dir(d);
    Ok(removed)
}

#[derive(Debug, Error)]
pub enum PinError {
    #[error(
        "{path} holds a newer pinned layout (v{version}) than this controller's (v{own}); run \
         the newer controller, or `agentwall uninstall` it first"
    )]
    Newer {
        path: PathBuf,
        version: u32,
        own: u32,
    },
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
        if path.exists() {
            check_map(&path, &spec)?;
        }
    }
    Ok(())
}

/// Checks the map pinned at `path` against `spec`.
pub fn check_map(path: &Path, spec: &MapSpec) -> Result<(), PinError> {
    let info = MapInfo::from_pin(path).map_err(|e| PinError::Mismatch {
        path: path.to_path_buf(),
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
        // 0: any size (a retired layout's ring may have been sized by its controller).
        if spec.max_entries == 0 {
            found.3
        } else {
            spec.max_entries
        },
    );
    if found != want {
        return Err(PinError::Mismatch {
            path: path.to_path_buf(),
            reason: format!(
                "found type {}, key {} B, value {} B, {} entries; expected {}, key {} B, \
                 value {} B, {} entries",
                found.0, found.1, found.2, found.3, want.0, want.1, want.2, want.3
            ),
        });
    }
    Ok(())
}

/// The spec of map `name` in this layout.
pub fn spec(name: &str, ring_bytes: Option<u32>) -> Option<MapSpec> {
    expected_maps(ring_bytes)
        .into_iter()
        .find(|s| s.name == name)
}

/// Whether programs are pinned (attached) in `dir`.
pub fn links_exist(dir: &Path, programs: &[&str]) -> bool {
    programs.iter().all(|p| dir.join("links").join(p).exists())
}

/// Opens a pinned object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> Result<OwnedFd, PinError> {
    sys::obj_get(path).map_err(|source| PinError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces the program of the link pinned at `link` with `prog`, atomically (BPF_LINK_UPDATE):
/// there is no moment when the hook runs neither program.
pub fn link_update(link: &Path, prog: impl AsFd) -> Result<(), PinError> {
    let fd = obj_get(link)?;
    tracing::debug!(link = %link.display(), "updating link");
    sys::link_update(&fd, prog).map_err(|source| PinError::Io {
        path: link.to_path_buf(),
        source,
    })
}

/// Where the runtime state of the controller pinned at `pin_dir` is kept (bpffs holds pins
/// only): /run/agentwall/state/<pin dir with '/' as '_'>.json.
pub fn state_file(pin_dir: &Path) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from("/run/agentwall/state").join(format!("{name}.json"))
}

/// Removes everything pinned in `dir`: links first (that detaches the programs), then maps, and
/// the controller's state file. Returns the pins removed.
pub fn uninstall(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        removed.extend(remove_pins(&dir.join(sub))?);
    }
    // The controller's tasks, grants and pending requests name what the pins enforced: gone
    // with them.
    let state = state_file(dir);
    let _ = std::fs::remove_file(state.with_extension("requests.json"));
    let _ = std::fs::remove_file(state);
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
            PathBuf::from("/sys/fs/bpf/agentwall/v7")
        );
    }

    #[test]
    fn older_layouts_are_found_and_newer_ones_refused() {
        let base = std::env::temp_dir().join(format!("agentwall-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        for d in ["v1", "v2", "v10", "other"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        assert_eq!(
            older_layouts(&base.join("v10")).unwrap(),
            [base.join("v1"), base.join("v2")]
        );
        let newer = older_layouts(&base.join("v1")).unwrap_err().to_string();
        assert!(newer.contains("newer pinned layout (v"), "{newer}");
        // A pin directory not named v<N> has no siblings to retire.
        assert!(older_layouts(&base.join("other")).unwrap().is_empty());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn expected_maps_are_the_pinned_maps() {
        let specs: Vec<&str> = expected_maps(None).iter().map(|m| m.name).collect();
        assert_eq!(specs, names::PINNED_MAPS);
    }

    #[test]
    fn expected_maps_match_the_shared_types() {
        let maps = expected_maps(None);
        let v4 = maps.iter().find(|m| m.name == names::RULES_V4_MAP).unwrap();
        assert_eq!((v4.key_size, v4.value_size), (12, 196));
        let v6 = maps.iter().find(|m| m.name == names::RULES_V6_MAP).unwrap();
        assert_eq!(v6.key_size, 24);
        let unix = maps.iter().find(|m| m.name == names::UNIX_MAP).unwrap();
        assert_eq!((unix.key_size, unix.value_size), (116, 4));
        let agents = maps.iter().find(|m| m.name == names::AGENTS_MAP).unwrap();
        assert_eq!(agents.value_size, 88);
        let rate = maps.iter().find(|m| m.name == names::RATE_MAP).unwrap();
        assert_eq!(
            (rate.map_type, rate.key_size, rate.value_size),
            (MapType::LruHash, 8, 8)
        );
        let g4 = maps
            .iter()
            .find(|m| m.name == names::GRANTS_V4_MAP)
            .unwrap();
        assert_eq!((g4.key_size, g4.value_size), (16, 200));
        let g6 = maps
            .iter()
            .find(|m| m.name == names::GRANTS_V6_MAP)
            .unwrap();
        assert_eq!(g6.key_size, 28);
        let exes = maps.iter().find(|m| m.name == names::EXES_MAP).unwrap();
        assert_eq!((exes.key_size, exes.value_size), (4, 264));
        let ring = |m: &[MapSpec]| {
            m.iter()
                .find(|m| m.name == names::EVENTS_MAP)
                .unwrap()
                .max_entries
        };
        assert_eq!(ring(&expected_maps(Some(4096))), 4096);
    }
}
