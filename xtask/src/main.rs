//! `cargo xtask ...`: toolchain setup, builds, the full test run, the demo.
//!
//! Every install step the project needs lives in `setup`, so a fresh machine (or CI) gets
//! the same environment as a developer's: nothing installed by hand survives to CI.

mod bench;
mod fuzz;
mod setup;
mod util;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use util::{cargo, is_root, run, run_status, run_tests, target_directory, workspace_root};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "agentwall developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the project needs (each step is skipped when already done).
    Setup,
    /// Setup, then build every binary and test of the host workspace (the eBPF object is
    /// built by agent-userspace's build script).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Setup, then run every check and test: fmt, clippy (host and eBPF), unit tests, a short
    /// fuzz run and the root-only kernel tests. Arguments after `--` go to the kernel test
    /// binaries (for example `cargo xtask test -- --test-threads=1`).
    Test {
        /// Extra arguments for the kernel test binaries.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, then run `agentwall demo` (needs root).
    Demo,
    /// Setup, then run each cargo-fuzz target of fuzz/ for a bounded time (a crash fails
    /// and prints the failing input's path).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
    },
    /// Setup, build and run the benchmarks as root: agentwall against nothing attached,
    /// nftables and a tinyproxy CONNECT allowlist, interleaved; prints the tables and writes
    /// target/bench/latest.json (docs/benchmarks.md).
    Bench {
        /// A short run (under a minute): fewer operations per run, still 4 rounds.
        #[arg(long)]
        quick: bool,
        /// Rounds (at least 4; default 8, or 4 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
        /// Only these rows: `runtime` (grant/revoke latency, revoke to reset, the connect rate
        /// with live grants, and the floor's TCP row it is compared with); `dns` (the DNS
        /// proxy: lookup latency against the upstream asked directly, the proxy's time split,
        /// queries/s at saturation, queries failed across a controller restart).
        #[arg(long)]
        only: Option<String>,
        /// Further arguments for agentwall-bench (e.g. `-- --idle-wait 60`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    // Every cargo command below runs from the workspace root, whatever the caller's cwd.
    std::env::set_current_dir(workspace_root()).context("cannot enter the workspace root")?;
    match cmd {
        Cmd::Setup => setup::setup().map(|()| ExitCode::SUCCESS),
        Cmd::Build { release } => build(release).map(|()| ExitCode::SUCCESS),
        Cmd::Test { args } => test(&args).map(|()| ExitCode::SUCCESS),
        Cmd::Demo => demo(),
        Cmd::Fuzz { seconds } => {
            setup::setup()?;
            fuzz::fuzz(seconds).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Bench {
            quick,
            rounds,
            only,
            args,
        } => bench::bench(quick, rounds, only.as_deref(), &args),
    }
}

/// Host workspace build: everything but agent-ebpf, which is a bpfel-target crate that
/// agent-userspace's build script compiles itself.
fn build(release: bool) -> Result<()> {
    setup::setup()?;
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--bins",
        "--tests",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

const ROOT_MESSAGE: &str = "kernel tests need root (CAP_BPF, CAP_SYS_ADMIN): run as root";

/// Runs named steps in order, stops at the first failure, and always prints which ran.
struct Steps {
    passed: Vec<&'static str>,
}

impl Steps {
    fn step(&mut self, name: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        println!("xtask: ==> {name}");
        match f() {
            Ok(()) => {
                self.passed.push(name);
                Ok(())
            }
            Err(e) => {
                println!(
                    "xtask test: FAILED at `{name}`; passed before it: {}",
                    self.list()
                );
                Err(e).with_context(|| format!("step `{name}` failed"))
            }
        }
    }

    fn list(&self) -> String {
        if self.passed.is_empty() {
            "(none)".to_string()
        } else {
            self.passed.join(", ")
        }
    }
}

fn test(kernel_test_args: &[String]) -> Result<()> {
    let mut steps = Steps { passed: Vec::new() };
    steps.step("setup", setup::setup)?;
    steps.step("fmt", || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    steps.step("clippy (host)", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    steps.step("clippy (agent-ebpf, bpfel)", || {
        run(cargo().args([
            "+nightly",
            "clippy",
            "-p",
            "agent-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    let mut tally = util::Tally::default();
    steps.step("unit tests", || run_tests(cargo().arg("test"), &mut tally))?;
    steps.step("fuzz (short run)", || fuzz::fuzz(fuzz::TEST_SECONDS))?;
    steps.step("kernel tests (root)", || {
        if !is_root()? {
            bail!(ROOT_MESSAGE);
        }
        // The daemon tests run the agentwall binary itself.
        run(cargo().args(["build", "-p", "agent-userspace", "--bins"]))?;
        let mut cmd = cargo();
        cmd.args(["test", "-p", "agentwall-tests"]);
        if !kernel_test_args.is_empty() {
            cmd.arg("--").args(kernel_test_args);
        }
        run_tests(&mut cmd, &mut tally)
    })?;
    println!("xtask test: all steps passed: {}", steps.list());
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

fn demo() -> Result<ExitCode> {
    if !is_root()? {
        bail!("the demo loads eBPF programs and needs root (CAP_BPF, CAP_SYS_ADMIN): run as root");
    }
    setup::setup()?;
    run(cargo().args(["build", "-p", "agent-userspace", "--bins"]))?;
    let bin = target_directory()?.join("debug").join("agentwall");
    let status = run_status(std::process::Command::new(&bin).arg("demo"))?;
    Ok(util::exit_code(status))
}
