//! `herald-delay`: the delay stage alone (`herald run --stages delay` runs it in the all-in-one binary).

fn main() -> std::process::ExitCode {
    herald_core::cli::stage_main("delay", &herald_providers::REGISTRY, |deps, shutdown| {
        Box::pin(herald_delay::run(deps, shutdown))
    })
}
