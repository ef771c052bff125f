//! Whether a set of compiled policies fits the kernel's maps. `run` (at start and on every
//! reload) and `agentwall policy check` ask the same question here, so a directory that checks
//! clean is one that `run` accepts.

use std::{
    fmt,
    iter::Sum,
    ops::Add,
    path::{Path, PathBuf},
};

use agent_common::{MAX_PREFIXES_V4, MAX_PREFIXES_V6, MAX_UNIX_PATHS};

use super::CompiledPolicy;

/// Kernel map entries taken: IPv4 and IPv6 trie prefixes, Unix socket path entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub v4: usize,
    pub v6: usize,
    pub unix: usize,
}

impl Usage {
    pub fn of(c: &CompiledPolicy) -> Usage {
        Usage {
            v4: c.v4.len(),
            v6: c.v6.len(),
            unix: c.unix.len(),
        }
    }
}

impl Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            v4: self.v4 + o.v4,
            v6: self.v6 + o.v6,
            unix: self.unix + o.unix,
        }
    }
}

impl Sum for Usage {
    fn sum<I: Iterator<Item = Usage>>(iter: I) -> Usage {
        iter.fold(Usage::default(), Add::add)
    }
}

/// The map that one family's entries go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
    Unix,
}

impl Family {
    const ALL: [Family; 3] = [Family::V4, Family::V6, Family::Unix];

    fn of(self, u: Usage) -> usize {
        match self {
            Family::V4 => u.v4,
            Family::V6 => u.v6,
            Family::Unix => u.unix,
        }
    }

    /// Entries the kernel map holds.
    pub fn capacity(self) -> usize {
        (match self {
            Family::V4 => MAX_PREFIXES_V4,
            Family::V6 => MAX_PREFIXES_V6,
            Family::Unix => MAX_UNIX_PATHS,
        }) as usize
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4 prefixes",
            Family::V6 => "IPv6 prefixes",
            Family::Unix => "Unix socket entries",
        })
    }
}

/// The policies need more entries of one family than the kernel map holds.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}: the policies need {need} {family}{}, and the kernel map holds {capacity}{}",
    Files(.largest),
    if *.installed > 0 { format!(" while {} are installed", .installed) } else { String::new() },
    if *.installed > 0 { " (old and new rules coexist while a reload switches)" } else { "" }
)]
pub struct CapacityError {
    pub family: Family,
    pub need: usize,
    /// Taken by the running policy (0 at start and for `policy check`).
    pub installed: usize,
    pub capacity: usize,
    /// The files that need the most, most first (at most three).
    pub largest: Vec<(PathBuf, usize)>,
}

struct Files<'a>(&'a [(PathBuf, usize)]);

impl fmt::Display for Files<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (path, n)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} ({n})", path.display())?;
        }
        Ok(())
    }
}

/// Checks that `policies` (each file with what it compiled to) fit beside `installed`, what the
/// running policy takes until a reload has switched over.
pub fn check_capacity(policies: &[(&Path, Usage)], installed: Usage) -> Result<(), CapacityError> {
    for family in Family::ALL {
        let need: usize = policies.iter().map(|(_, u)| family.of(*u)).sum();
        let installed = family.of(installed);
        if need + installed <= family.capacity() {
            continue;
        }
        let mut largest: Vec<(PathBuf, usize)> = policies
            .iter()
            .map(|(p, u)| (p.to_path_buf(), family.of(*u)))
            .filter(|(_, n)| *n > 0)
            .collect();
        largest.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        largest.truncate(3);
        return Err(CapacityError {
            family,
            need,
            installed,
            capacity: family.capacity(),
            largest,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(v4: usize, v6: usize, unix: usize) -> Usage {
        Usage { v4, v6, unix }
    }

    #[test]
    fn a_set_that_fits_passes_and_one_entry_more_fails_naming_the_files() {
        let cap = Family::V4.capacity();
        let (a, b) = (Path::new("/p/a.yaml"), Path::new("/p/b.yaml"));
        check_capacity(
            &[(a, u(cap - 10, 0, 0)), (b, u(10, 0, 0))],
            Usage::default(),
        )
        .unwrap();
        let e = check_capacity(
            &[(a, u(cap - 10, 0, 0)), (b, u(11, 0, 0))],
            Usage::default(),
        )
        .unwrap_err();
        assert_eq!((e.family, e.need, e.installed), (Family::V4, cap + 1, 0));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("/p/a.yaml ({}), /p/b.yaml (11): ", cap - 10)),
            "{msg}"
        );
        assert!(msg.contains(&format!("holds {cap}")), "{msg}");
    }

    #[test]
    fn what_is_installed_counts_until_the_switch() {
        let cap = Family::V6.capacity();
        let a = Path::new("a.yaml");
        check_capacity(&[(a, u(0, cap, 0))], Usage::default()).unwrap();
        let e = check_capacity(&[(a, u(0, cap, 0))], u(0, 1, 0)).unwrap_err();
        assert_eq!(e.family, Family::V6);
        assert!(e.to_string().contains("while 1 are installed"), "{e}");
    }

    #[test]
    fn unix_entries_have_their_own_limit() {
        let cap = Family::Unix.capacity();
        let e = check_capacity(&[(Path::new("u.yaml"), u(1, 1, cap + 1))], Usage::default())
            .unwrap_err();
        assert_eq!(e.family, Family::Unix);
        assert!(e.to_string().contains("Unix socket entries"), "{e}");
    }
}
