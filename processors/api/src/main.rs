//! `herald-api`: the api stage alone (`herald run --stages api` runs it in the all-in-one binary).

fn main() -> std::process::ExitCode {
    herald_core::cli::stage_main("api", &herald_providers::REGISTRY, |deps, shutdown| {
        Box::pin(herald_api::run(deps, shutdown))
    })
}
