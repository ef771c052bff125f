//! A DNS load generator process (agentwall_tests::dns_load): `dns_load SPEC-JSON`.

fn main() -> std::process::ExitCode {
    match agentwall_tests::dns_load::main_with(std::env::args().nth(1)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dns_load: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
