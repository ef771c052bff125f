//! `agentwall`: the controller daemon and its CLI (agentwall::cli).

fn main() -> std::process::ExitCode {
    agentwall::cli::main()
}
