//! `herald-render`: the render stage alone (`herald run --stages render` runs it in the all-in-one binary).

fn main() -> std::process::ExitCode {
    herald_render::sandbox::serve_if_child();
    herald_core::cli::stage_main("render", &herald_providers::REGISTRY, |deps, shutdown| {
        Box::pin(herald_render::run(deps, shutdown))
    })
}
