//! `ferro`: the one binary of Ferro. It plays every role — the all-in-one supervisor
//! (`ferro up`), the apiserver, the controllers, the node agent — and is the user's CLI.

use clap::Parser;

/// Ferro: a declarative infrastructure-as-a-service cloud.
#[derive(Parser, Debug)]
#[command(name = "ferro", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
