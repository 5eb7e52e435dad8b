//! `scalpel serve` (being written).

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    let _ = (args, json);
    anyhow::bail!("`scalpel serve` is not built yet")
}
