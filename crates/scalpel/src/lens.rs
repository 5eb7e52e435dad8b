//! `scalpel lens`: the logit lens. What the model would predict after each block if the residual
//! stream went straight to the final norm and unembedding, with the probability and rank of
//! chosen target tokens.

use anyhow::Result;
use candle_core::Tensor;
use scalpel_circuits::lens::{depth_hook, logit_lens};
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;
use crate::prompt;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// A token to follow through the layers (its text must be exactly one token); repeatable.
    #[arg(long = "target", value_name = "TEXT")]
    pub targets: Vec<String>,
    /// Predictions shown per layer and position.
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
    /// Show every position, not only the last.
    #[arg(long)]
    pub all_positions: bool,
}

#[derive(Serialize)]
struct Guess {
    id: u32,
    text: String,
    prob: f64,
}

#[derive(Serialize)]
struct TargetOut {
    id: u32,
    text: String,
    prob: f64,
    rank: usize,
}

#[derive(Serialize)]
struct CellOut {
    /// `blocks.0.hook_resid_pre` for the embeddings, else `blocks.{l}.hook_resid_post`.
    hook: String,
    depth: usize,
    position: usize,
    token: String,
    top: Vec<Guess>,
    targets: Vec<TargetOut>,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    let ids = prompt::encode(tok, &args.prompt, false, None)?;
    let targets: Vec<u32> = args
        .targets
        .iter()
        .map(|t| prompt::single_token(tok, t))
        .collect::<Result<_>>()?;
    let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let lens = logit_lens(model, &input, args.top_k, &targets)?;
    let text = |id: u32| tok.token_strings(&[id]).remove(0);
    let positions: Vec<usize> = if args.all_positions {
        (0..ids.len()).collect()
    } else {
        vec![ids.len() - 1]
    };
    let mut cells = Vec::new();
    for depth in 0..lens.depths {
        for &pos in &positions {
            let Some(c) = lens.cell(depth, pos) else {
                continue;
            };
            cells.push(CellOut {
                hook: depth_hook(depth).to_string(),
                depth,
                position: pos,
                token: text(ids[pos]),
                top: c
                    .top
                    .iter()
                    .map(|g| Guess {
                        id: g.token,
                        text: text(g.token),
                        prob: g.prob,
                    })
                    .collect(),
                targets: c
                    .targets
                    .iter()
                    .map(|t| TargetOut {
                        id: t.token,
                        text: text(t.token),
                        prob: t.prob,
                        rank: t.rank,
                    })
                    .collect(),
            });
        }
    }
    if json {
        return print_json(&cells);
    }
    for c in &cells {
        let top: Vec<String> = c
            .top
            .iter()
            .map(|g| format!("{:?} {:.1}%", g.text, 100.0 * g.prob))
            .collect();
        let targets: Vec<String> = c
            .targets
            .iter()
            .map(|t| format!("{:?} {:.2}% (rank {})", t.text, 100.0 * t.prob, t.rank))
            .collect();
        println!(
            "{:<28} pos {:>3} {:<12} {}{}",
            c.hook,
            c.position,
            format!("{:?}", c.token),
            top.join("  "),
            if targets.is_empty() {
                String::new()
            } else {
                format!("   | {}", targets.join("  "))
            }
        );
    }
    Ok(())
}
