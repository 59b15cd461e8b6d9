//! `herald-sim`: every provider simulator on one port (see the library docs for the paths).
//!
//! Usage: herald-sim --listen 127.0.0.1:18100 \
//!   [--receipts aliyun=http://127.0.0.1:8080/callbacks/aliyun-sim/<token>] [--receipts tencent=…]

use std::collections::HashMap;

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18100")]
    listen: String,
    /// `provider=url`: where to push that provider's delivery receipts.
    #[arg(long)]
    receipts: Vec<String>,
    /// Print the simulators' credentials as shell exports and exit (scripts/stack env).
    #[arg(long)]
    print_env: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    herald_core::telemetry::init_tracing();
    let args = Args::parse();
    if args.print_env {
        for (var, _) in herald_simulators::CREDENTIALS {
            println!("export {var}='{}'", herald_simulators::credential(var));
        }
        return Ok(());
    }
    let receipts: HashMap<String, String> = args
        .receipts
        .iter()
        .filter_map(|r| r.split_once('=').map(|(p, u)| (p.to_owned(), u.to_owned())))
        .collect();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("herald-sim listening on {}", args.listen);
    axum::serve(
        listener,
        herald_simulators::router(herald_simulators::Sim::new(receipts)),
    )
    .await?;
    Ok(())
}
