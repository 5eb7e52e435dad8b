//! `scalpel run`: one forward pass over a prompt; each position's token and the model's top-k
//! predictions for the next one, plus summary statistics of any requested hook activations.

use std::collections::HashSet;
use std::io::Write;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use scalpel_core::HookPoint;
use scalpel_models::tokenizer::Tokenizer;
use scalpel_models::transformer::Model;
use serde::Serialize;

use crate::hooks::{symbolic_shape, Dim};
use crate::model::ModelArgs;
use crate::output::print_json;
use crate::prompt;

/// Options of `scalpel run`.
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "tokens"]))]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to run.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Token ids to run instead of a prompt, comma-separated (works without a tokenizer).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub tokens: Vec<u32>,
    /// Predictions to show per position.
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub top_k: usize,
    /// Wrap the prompt as one user message in the model's chat template, with the generation
    /// prompt that opens the assistant's turn.
    #[arg(long, conflicts_with = "tokens")]
    pub chat: bool,
    /// Hook points to summarise, comma-separated (canonical names or TransformerLens shorthand
    /// such as `resid_post.5`).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub hooks: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    tokens: Vec<Position>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hooks: Vec<HookStats>,
}

/// One input position: its token and the predictions for the next one.
#[derive(Serialize)]
struct Position {
    pos: usize,
    id: u32,
    /// The token's text; null without a tokenizer.
    text: Option<String>,
    top: Vec<Prediction>,
}

#[derive(Serialize)]
struct Prediction {
    id: u32,
    text: Option<String>,
    prob: f32,
    logit: f32,
}

/// Statistics of one hook activation (over its finite elements).
#[derive(Serialize)]
struct HookStats {
    name: String,
    shape: Vec<usize>,
    mean: f64,
    std: f64,
    /// L2 norm of the activation at the last position.
    norm_last: f64,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let points = args
        .hooks
        .iter()
        .map(|name| model.hook_point(name))
        .collect::<Result<Vec<HookPoint>, _>>()?;
    let tok = loaded.tokenizer.as_ref();
    let ids = match &args.prompt {
        Some(text) => prompt::encode(loaded.tokenizer()?, text, args.chat, None)?,
        None => args.tokens.clone(),
    };
    let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?; // [1, p]
    let wanted: HashSet<HookPoint> = points.iter().copied().collect();
    let (logits, cache) = model.run_with_cache(&input, |hp| wanted.contains(&hp))?;
    let logits: Vec<Vec<f32>> = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec2()?; // [p, v]

    let text = |id: u32| tok.map(|t| t.token_strings(&[id]).remove(0));
    let tokens = ids
        .iter()
        .zip(&logits)
        .enumerate()
        .map(|(pos, (&id, row))| Position {
            pos,
            id,
            text: text(id),
            top: top_k(row, args.top_k)
                .into_iter()
                .map(|(id, prob, logit)| Prediction {
                    id,
                    text: text(id),
                    prob,
                    logit,
                })
                .collect(),
        })
        .collect();
    let hooks = points
        .iter()
        .map(|&hp| {
            let act = cache
                .get(hp)
                .with_context(|| format!("the forward pass did not record `{hp}`"))?;
            hook_stats(model, hp, act)
        })
        .collect::<Result<_>>()?;
    let report = Report {
        model: args.model.model,
        tokens,
        hooks,
    };
    if json {
        print_json(&report)
    } else {
        print_table(&report, args.top_k, tok)
    }
}

/// The `k` largest logits of `row` as `(id, softmax probability, logit)`, most likely first.
fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32, f32)> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = row
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln()
        + max as f64;
    let mut order: Vec<usize> = (0..row.len()).collect();
    let k = k.min(row.len());
    let by_logit = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]);
    if k < order.len() {
        order.select_nth_unstable_by(k, by_logit);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit);
    order
        .into_iter()
        .map(|i| (i as u32, (row[i] as f64 - log_z).exp() as f32, row[i]))
        .collect()
}

fn hook_stats(model: &Model, hp: HookPoint, act: &Tensor) -> Result<HookStats> {
    let act = act.to_dtype(DType::F32)?;
    let values: Vec<f32> = act.flatten_all()?.to_vec1()?;
    let (n, sum, sum_sq) = finite_sums(&values);
    let mean = sum / n.max(1.0);
    let std = (sum_sq / n.max(1.0) - mean * mean).max(0.0).sqrt();
    // The last position along the sequence dimension (the query one for attention patterns).
    let last = match symbolic_shape(model, hp)
        .iter()
        .position(|d| *d == Dim::Pos)
    {
        Some(dim) => act.narrow(dim, act.dim(dim)? - 1, 1)?,
        None => act.clone(),
    };
    let (_, _, last_sq) = finite_sums(&last.flatten_all()?.to_vec1::<f32>()?);
    Ok(HookStats {
        name: hp.to_string(),
        shape: act.dims().to_vec(),
        mean,
        std,
        norm_last: last_sq.sqrt(),
    })
}

/// Count, sum and sum of squares of the finite values (masked attention scores are -inf).
fn finite_sums(values: &[f32]) -> (f64, f64, f64) {
    values
        .iter()
        .filter(|v| v.is_finite())
        .fold((0.0, 0.0, 0.0), |(n, s, sq), &v| {
            let v = v as f64;
            (n + 1.0, s + v, sq + v * v)
        })
}

fn print_table(r: &Report, k: usize, tok: Option<&Tokenizer>) -> Result<()> {
    let shown = |id: u32, text: &Option<String>| match text {
        Some(t) => format!("{t:?}"),
        None => format!("#{id}"),
    };
    let mut out = std::io::stdout().lock();
    let width = r
        .tokens
        .iter()
        .map(|p| shown(p.id, &p.text).chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    writeln!(
        out,
        "{:>4} {:>7}  {:<width$}  top-{k} next tokens",
        "pos", "id", "token"
    )?;
    for p in &r.tokens {
        let top: Vec<String> = p
            .top
            .iter()
            .map(|t| format!("{} {:.1}%", shown(t.id, &t.text), 100.0 * t.prob))
            .collect();
        let token = shown(p.id, &p.text);
        writeln!(
            out,
            "{:>4} {:>7}  {token:<width$}  {}",
            p.pos,
            p.id,
            top.join("  ")
        )?;
    }
    if tok.is_none() {
        writeln!(out, "(no tokenizer: tokens shown as #id)")?;
    }
    if !r.hooks.is_empty() {
        let width = r.hooks.iter().map(|h| h.name.len()).max().unwrap_or(0);
        writeln!(out)?;
        writeln!(
            out,
            "{:<width$}  {:<18} {:>10} {:>10} {:>10}",
            "hook", "shape", "mean", "std", "norm@last"
        )?;
        for h in &r.hooks {
            writeln!(
                out,
                "{:<width$}  {:<18} {:>10.4} {:>10.4} {:>10.4}",
                h.name,
                format!("{:?}", h.shape),
                h.mean,
                h.std,
                h.norm_last
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_logit_and_normalises_over_the_whole_row() {
        let row = [0.0f32, 2.0, 1.0, 2.0f32.ln() + 1.0];
        let top = top_k(&row, 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        let z: f32 = row.iter().map(|l| l.exp()).sum();
        assert!((top[0].1 - 2f32.exp() / z).abs() < 1e-6);
        assert_eq!(top_k(&row, 10).len(), 4);
    }
}
