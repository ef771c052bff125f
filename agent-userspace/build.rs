//! Builds the eBPF object from agent-ebpf's source on every build that needs it, with the
//! nightly toolchain, into OUT_DIR (never picked from ../target, never committed).

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("workspace root")?.to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR")?);
    for p in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-common/src",
        "agent-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--locked", "--release"])
        .args([
            "-p",
            "agent-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer (stable) cargo's settings must not leak into the nested nightly build.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let outer = (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTUP_TOOLCHAIN")
            || k.starts_with("RUSTFLAGS")
            || k.starts_with("RUSTDOC")
            || [
                "TARGET",
                "HOST",
                "OUT_DIR",
                "PROFILE",
                "OPT_LEVEL",
                "DEBUG",
                "NUM_JOBS",
            ]
            .contains(&k.as_str());
        if outer {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .context("running `rustup run nightly cargo build` for agent-ebpf")?;
    if !status.success() {
        bail!(
            "building the eBPF object (agent-ebpf) failed: {status}. \
             If rust-src or bpf-linker is missing, run `cargo xtask setup` first."
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/agent-ebpf");
    std::fs::copy(&obj, out.join("agent-ebpf.o"))
        .with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}
