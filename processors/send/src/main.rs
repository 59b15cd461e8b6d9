//! `herald-send`: the send stage alone (`herald run --stages send` runs it in the all-in-one binary).

fn main() -> std::process::ExitCode {
    herald_core::cli::stage_main("send", &herald_providers::REGISTRY, |deps, shutdown| {
        Box::pin(herald_send::run(deps, shutdown))
    })
}
