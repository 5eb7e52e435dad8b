//! Placeholder while this subcommand is written.

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("this subcommand is not built yet")
}
