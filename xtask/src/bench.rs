//! `cargo xtask bench`: setup, build agentwall-bench in release, run it as root.
//!
//! The bench compares agentwall with nothing attached, nftables and a tinyproxy CONNECT
//! allowlist in one interleaved run, prints the tables and writes JSON (docs/benchmarks.md).

use std::process::{Command, ExitCode};

use anyhow::{bail, Result};

use crate::{
    setup,
    util::{cargo, exit_code, is_root, run, run_status, target_directory},
};

pub fn bench(
    quick: bool,
    rounds: Option<usize>,
    only: Option<&str>,
    args: &[String],
) -> Result<ExitCode> {
    if !is_root()? {
        bail!(
            "the benchmarks load eBPF programs and nftables rules and create cgroups: run \
             `cargo xtask bench` as root"
        );
    }
    setup::setup()?;
    run(cargo().args(["build", "--release", "-p", "agentwall-bench"]))?;
    let target = target_directory()?;
    let bin = target.join("release").join("agentwall-bench");
    let json = target.join("bench").join("latest.json");
    let mut cmd = Command::new(&bin);
    cmd.arg("--json").arg(&json);
    if quick {
        cmd.arg("--quick");
    }
    if let Some(r) = rounds {
        cmd.arg("--rounds").arg(r.to_string());
    }
    if let Some(o) = only {
        cmd.arg("--only").arg(o);
    }
    cmd.args(args);
    let status = run_status(&mut cmd)?;
    Ok(exit_code(status))
}
