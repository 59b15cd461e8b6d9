//! `herald-projector`: the projector stage alone (`herald run --stages projector` runs it in the all-in-one binary).

fn main() -> std::process::ExitCode {
    herald_core::cli::stage_main(
        "projector",
        &herald_providers::REGISTRY,
        |deps, shutdown| Box::pin(herald_projector::run(deps, shutdown)),
    )
}
