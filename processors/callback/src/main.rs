//! `herald-callback`: the provider callback endpoints alone, on `HERALD_CALLBACK_LISTEN`
//! (default 127.0.0.1:8090).

fn main() -> std::process::ExitCode {
    herald_core::cli::stage_main("callback", &herald_providers::REGISTRY, |deps, shutdown| {
        let listen =
            std::env::var("HERALD_CALLBACK_LISTEN").unwrap_or_else(|_| "127.0.0.1:8090".into());
        Box::pin(herald_callback::run(deps, listen, shutdown))
    })
}
