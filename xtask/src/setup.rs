//! `cargo xtask setup`: every install step a fresh machine needs, each skipped when done.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::util::{
    capture, cargo, cargo_bin_dir, display, ensure_cargo_bin_on_path, home, is_executable, is_root,
    run, which,
};

/// The nightly toolchain the eBPF side is built with, pinned by its commit date.
/// `RUSTUP_AUTO_INSTALL=0` on these machines: a dated channel is never installed by us,
/// we only check that `nightly` is this one.
pub const NIGHTLY_COMMIT_DATE: &str = "2026-05-19";
/// The LLVM major version of that nightly; bpf-linker is built against its libLLVM.
const NIGHTLY_LLVM_MAJOR: u32 = 22;
/// bpf-linker release line (0.13 is the first with an `llvm-22` feature; 0.14 may drop it).
const BPF_LINKER_VERSION: &str = "^0.13";

/// A Debian package the project needs, and the commands or files that show it is installed
/// (any one present is enough). A bare name is looked up on PATH and in the sbin dirs.
struct AptPackage {
    package: &'static str,
    provides: &'static [&'static str],
}

const APT_PACKAGES: &[AptPackage] = &[
    AptPackage {
        package: "iproute2",
        provides: &["/usr/sbin/ip", "ip"],
    },
    // `cargo xtask bench`: the nftables and HTTP CONNECT proxy configurations (tinyproxy-bin is
    // the executable alone: installing it starts no system service).
    AptPackage {
        package: "nftables",
        provides: &["/usr/sbin/nft", "nft"],
    },
    AptPackage {
        package: "tinyproxy-bin",
        provides: &["/usr/bin/tinyproxy", "tinyproxy"],
    },
    // tests/tests/nats.rs: a real JetStream broker the test starts and stops itself (the
    // package's own service is not used).
    AptPackage {
        package: "nats-server",
        provides: &["/usr/sbin/nats-server", "nats-server"],
    },
];

pub fn setup() -> Result<()> {
    let start = Instant::now();
    ensure_cargo_bin_on_path()?;
    let sysroot = check_nightly()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)?;
    cargo_fuzz()?;
    apt_packages()?;
    println!("setup: done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// `rustc +nightly -vV` must exist and be the pinned one. Returns its sysroot.
fn check_nightly() -> Result<PathBuf> {
    let vv = capture(Command::new("rustc").args(["+nightly", "-vV"])).with_context(|| {
        format!(
            "the `nightly` toolchain (commit date {NIGHTLY_COMMIT_DATE}) is required; \
             install it with rustup as `nightly`"
        )
    })?;
    let date = commit_date(&vv).context("`rustc +nightly -vV` printed no commit-date")?;
    if date != NIGHTLY_COMMIT_DATE {
        bail!(
            "`nightly` is from {date}, but this project is pinned to the nightly of \
             {NIGHTLY_COMMIT_DATE} (xtask/src/setup.rs NIGHTLY_COMMIT_DATE); install that one as \
             `nightly` (xtask never installs toolchains) or update the pin"
        );
    }
    let llvm = llvm_major(&vv).context("`rustc +nightly -vV` printed no LLVM version")?;
    if llvm != NIGHTLY_LLVM_MAJOR {
        bail!("nightly uses LLVM {llvm}, expected {NIGHTLY_LLVM_MAJOR} (NIGHTLY_LLVM_MAJOR)");
    }
    let sysroot = capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    println!("nightly: ok, commit-date {date}, LLVM {llvm} (skipped: nothing to install)");
    Ok(PathBuf::from(sysroot.trim()))
}

/// The `commit-date: YYYY-MM-DD` field of `rustc -vV`.
fn commit_date(rustc_vv: &str) -> Option<&str> {
    rustc_vv
        .lines()
        .find_map(|l| l.trim().strip_prefix("commit-date:"))
        .map(str::trim)
        .filter(|d| !d.is_empty())
}

/// The major of the `LLVM version: 22.1.4` field of `rustc -vV`.
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.trim().strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

/// rust-src for nightly (`-Z build-std=core` needs it).
fn rust_src(sysroot: &Path) -> Result<()> {
    let core = sysroot.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        println!("rust-src: skipped, present for nightly");
        return Ok(());
    }
    // Another rustup may be installing it right now; retry a few times before giving up.
    let mut attempt = 1;
    loop {
        let result = run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]));
        if core.is_dir() {
            println!("rust-src: installed for nightly");
            return Ok(());
        }
        if attempt == 3 {
            return result
                .and_then(|()| bail!("rustup succeeded but {} is missing", core.display()))
                .context("cannot install rust-src for nightly");
        }
        println!("rust-src: not there yet (attempt {attempt}), retrying in 20s");
        thread::sleep(Duration::from_secs(20));
        attempt += 1;
    }
}

/// bpf-linker, built against the nightly toolchain's own libLLVM (prebuilt downloads are
/// unreachable here). Skipped when a working one is on PATH or in the cargo bin dir.
fn bpf_linker(sysroot: &Path) -> Result<()> {
    if let Some(version) = working_bpf_linker()? {
        println!("bpf-linker: skipped, {version} works");
        return Ok(());
    }

    let libllvm = nightly_libllvm(sysroot)?;
    let soname = libllvm
        .file_name()
        .context("libLLVM path has no file name")?
        .to_owned();
    let prefix = home()?
        .join(".cache/agentwall")
        .join(format!("llvm-{NIGHTLY_LLVM_MAJOR}"));
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(&soname)] {
        let link = lib.join(name);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("cannot link {} -> {}", link.display(), libllvm.display()))?;
    }
    println!(
        "bpf-linker: building against {} (LLVM_PREFIX={})",
        libllvm.display(),
        prefix.display()
    );

    let start = Instant::now();
    let mut install = cargo();
    install
        .env("LLVM_PREFIX", &prefix)
        .args(["+nightly", "install", "bpf-linker", "--locked"])
        .args(["--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{NIGHTLY_LLVM_MAJOR}"));
    run(&mut install)?;
    match working_bpf_linker()? {
        Some(version) => {
            println!(
                "bpf-linker: installed {version} in {:.0}s",
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        None => bail!(
            "`{}` finished but bpf-linker does not run (its libLLVM comes from {})",
            display(&install),
            lib.display()
        ),
    }
}

/// `bpf-linker --version` of the first bpf-linker that runs, on PATH or in the cargo bin dir.
fn working_bpf_linker() -> Result<Option<String>> {
    let candidates = which("bpf-linker")
        .into_iter()
        .chain(Some(cargo_bin_dir()?.join("bpf-linker")));
    for path in candidates.filter(|p| is_executable(p)) {
        if let Ok(out) = Command::new(&path).arg("--version").output() {
            if out.status.success() {
                let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return Ok(Some(format!("{version} ({})", path.display())));
            }
        }
    }
    Ok(None)
}

/// The real libLLVM shared object in the nightly sysroot's lib dir: of the `libLLVM*.so*`
/// files there, the one that is an ELF file (others are linker scripts or links to it).
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let dir = sysroot.join("lib");
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !(name.starts_with("libLLVM") && name.contains(".so")) {
            continue;
        }
        let md = path.symlink_metadata()?;
        if md.is_file() && is_elf(&path) {
            found.push(path);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM*.so* shared object in {} (is this a rustup toolchain?)",
            dir.display()
        ),
        many => bail!(
            "several libLLVM shared objects in {}: {many:?}",
            dir.display()
        ),
    }
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|()| magic == *b"\x7fELF")
        .unwrap_or(false)
}

/// Debian packages: `apt-get update` once and one `apt-get install` for what is missing.
fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|p| !p.provides.iter().any(|c| provided(c)))
        .map(|p| p.package)
        .collect();
    let all: Vec<&str> = APT_PACKAGES.iter().map(|p| p.package).collect();
    if missing.is_empty() {
        println!("apt packages: skipped, present: {}", all.join(" "));
        return Ok(());
    }
    if !is_root()? {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root to install them",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd
    };
    run(&mut apt(&["update"]))?;
    run(apt(&["install", "-y", "--no-install-recommends"]).args(&missing))?;
    let still: Vec<String> = APT_PACKAGES
        .iter()
        .filter(|p| !p.provides.iter().any(|c| provided(c)))
        .map(|p| format!("{} (none of {:?})", p.package, p.provides))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install succeeded, but these are still missing: {}",
            still.join(", ")
        );
    }
    println!("apt packages: installed {}", missing.join(" "));
    Ok(())
}

/// cargo-fuzz release line (0.13 builds with the stable toolchain and drives the pinned nightly).
const CARGO_FUZZ_VERSION: &str = "^0.13";

/// cargo-fuzz, for `cargo xtask fuzz` and the short fuzz run of `cargo xtask test`. Skipped when
/// `cargo +nightly fuzz --version` works: that is how the fuzz runs call it.
fn cargo_fuzz() -> Result<()> {
    if let Some(version) = working_cargo_fuzz() {
        println!("cargo-fuzz: skipped, {version} works with nightly");
        return Ok(());
    }
    let start = Instant::now();
    run(cargo()
        .args(["install", "cargo-fuzz", "--locked"])
        .args(["--version", CARGO_FUZZ_VERSION]))?;
    match working_cargo_fuzz() {
        Some(version) => {
            println!(
                "cargo-fuzz: installed {version} in {:.0}s",
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        None => bail!("cargo-fuzz was installed, but `cargo +nightly fuzz --version` fails"),
    }
}

/// `cargo +nightly fuzz --version`, when it runs.
fn working_cargo_fuzz() -> Option<String> {
    capture(cargo().args(["+nightly", "fuzz", "--version"]))
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| v.starts_with("cargo-fuzz"))
}

fn provided(check: &str) -> bool {
    if check.starts_with('/') {
        Path::new(check).exists()
    } else {
        which(check).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIGHTLY_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)
binary: rustc
commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a
commit-date: 2026-05-19
host: x86_64-unknown-linux-gnu
release: 1.97.0-nightly
LLVM version: 22.1.4
";

    #[test]
    fn commit_date_is_parsed() {
        assert_eq!(commit_date(NIGHTLY_VV), Some("2026-05-19"));
        assert_eq!(commit_date(NIGHTLY_VV), Some(NIGHTLY_COMMIT_DATE));
        let other = NIGHTLY_VV.replace("commit-date: 2026-05-19", "commit-date: 2026-06-01");
        assert_eq!(commit_date(&other), Some("2026-06-01"));
        assert_ne!(commit_date(&other), Some(NIGHTLY_COMMIT_DATE));
        // Builds without git info print `commit-date: unknown`: a mismatch, not a match.
        assert_eq!(commit_date("commit-date: unknown\n"), Some("unknown"));
        assert_eq!(commit_date("commit-date:\n"), None);
        assert_eq!(commit_date("rustc 1.97.0-nightly\n"), None);
        assert_eq!(commit_date(""), None);
    }

    #[test]
    fn llvm_major_is_parsed() {
        assert_eq!(llvm_major(NIGHTLY_VV), Some(22));
        assert_eq!(llvm_major("LLVM version: 21.1.0\n"), Some(21));
        assert_eq!(llvm_major("release: 1.97.0\n"), None);
    }

    #[test]
    fn apt_checks_are_well_formed() {
        for p in APT_PACKAGES {
            assert!(
                !p.package.is_empty() && !p.provides.is_empty(),
                "{}",
                p.package
            );
        }
    }
}
