//! `herald-accept`: the accept stage alone (`herald run --stages accept` runs it in the all-in-one binary).

fn main() -> std::process::ExitCode {
    herald_core::cli::stage_main("accept", &herald_providers::REGISTRY, |deps, shutdown| {
        Box::pin(herald_accept::run(deps, shutdown))
    })
}
