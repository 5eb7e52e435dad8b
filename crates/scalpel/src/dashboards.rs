//! `scalpel dashboards` (being written).

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(args: Args, json: bool) -> anyhow::Result<()> {
    let _ = (args, json);
    anyhow::bail!("`scalpel dashboards` is not built yet")
}
