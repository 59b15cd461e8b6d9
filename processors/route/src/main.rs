//! `herald-route`: the route stage alone (`herald run --stages route` runs it in the all-in-one binary).

fn main() -> std::process::ExitCode {
    herald_core::cli::stage_main("route", &herald_providers::REGISTRY, |deps, shutdown| {
        Box::pin(herald_route::run(deps, shutdown))
    })
}
