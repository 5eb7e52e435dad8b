//! `scalpel heads`: previous-token, duplicate-token and induction scores of every attention head,
//! on random token sequences repeated once (the toy-model issue's definitions).

use anyhow::Result;
use scalpel_circuits::heads::{head_scores, repeated_random_tokens};
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Length of the random half (sequences are twice as long).
    #[arg(long, default_value_t = 32)]
    pub half: usize,
    /// Sequences averaged over.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens are drawn from ids `first_id..d_vocab` (the lowest ids are often special tokens).
    #[arg(long, default_value_t = 100)]
    pub first_id: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Heads listed per score, highest first (JSON always has every head).
    #[arg(long, default_value_t = 5)]
    pub top: usize,
}

#[derive(Serialize)]
struct Report {
    half: usize,
    batch: usize,
    seed: u64,
    #[serde(flatten)]
    scores: scalpel_circuits::heads::HeadScores,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let c = model.config();
    if 2 * args.half > c.n_ctx {
        anyhow::bail!(
            "--half {} makes sequences of {} tokens, longer than the model's context of {}",
            args.half,
            2 * args.half,
            c.n_ctx
        );
    }
    let tokens = repeated_random_tokens(
        args.first_id,
        c.d_vocab as u32,
        args.half,
        args.batch,
        args.seed,
    )?;
    let scores = head_scores(model, &tokens, args.half)?;
    if json {
        return print_json(&Report {
            half: args.half,
            batch: args.batch,
            seed: args.seed,
            scores,
        });
    }
    let (chance_prev, chance_ind) = scores.chance;
    for (name, m, chance) in [
        ("previous-token", &scores.previous_token, chance_prev),
        ("duplicate-token", &scores.duplicate_token, chance_ind),
        ("induction", &scores.induction, chance_ind),
    ] {
        let mut all: Vec<(usize, usize, f64)> = m
            .iter()
            .enumerate()
            .flat_map(|(l, row)| row.iter().enumerate().map(move |(h, &v)| (l, h, v)))
            .collect();
        all.sort_by(|a, b| b.2.total_cmp(&a.2));
        let top: Vec<String> = all
            .iter()
            .take(args.top)
            .map(|(l, h, v)| format!("L{l}H{h} {v:.3}"))
            .collect();
        println!("{name:<16} (uniform ≈ {chance:.3}): {}", top.join("  "));
    }
    Ok(())
}
