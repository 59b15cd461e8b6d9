//! `herald-notify`: the status-webhook stage alone (`herald run --stages notify` runs it in the
//! all-in-one binary).

fn main() -> std::process::ExitCode {
    herald_core::cli::stage_main("notify", &herald_providers::REGISTRY, |deps, shutdown| {
        Box::pin(herald_notify::run(deps, shutdown))
    })
}
