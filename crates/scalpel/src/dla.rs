//! `scalpel dla`: direct logit attribution. Splits the answer's logit (or the logit difference
//! against a wrong answer) at one position into the embeddings, every attention head, every
//! attention bias and every MLP, through the final norm with its scale frozen; the parts sum to
//! the whole.

use anyhow::Result;
use candle_core::Tensor;
use scalpel_circuits::dla::direct_logit_attribution;
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
    /// The answer whose logit is attributed (exactly one token, e.g. " Paris").
    #[arg(long)]
    pub answer: String,
    /// A wrong answer: attribute the logit difference answer − wrong instead.
    #[arg(long)]
    pub wrong: Option<String>,
    /// Position to attribute (default: the last).
    #[arg(long)]
    pub position: Option<usize>,
    /// Parts shown, largest |contribution| first (JSON always has all).
    #[arg(long, default_value_t = 15)]
    pub top: usize,
}

#[derive(Serialize)]
struct Report<'a> {
    answer: &'a str,
    wrong: Option<&'a str>,
    #[serde(flatten)]
    attribution: &'a scalpel_circuits::dla::Attribution,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    let ids = prompt::encode(tok, &args.prompt, false, None)?;
    let answer = prompt::single_token(tok, &args.answer)?;
    let wrong = args
        .wrong
        .as_deref()
        .map(|w| prompt::single_token(tok, w))
        .transpose()?;
    let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let a = direct_logit_attribution(model, &input, args.position, answer, wrong)?;
    if json {
        return print_json(&Report {
            answer: &args.answer,
            wrong: args.wrong.as_deref(),
            attribution: &a,
        });
    }
    let metric = match &args.wrong {
        Some(w) => format!("logit({:?}) − logit({w:?})", args.answer),
        None => format!("logit({:?})", args.answer),
    };
    println!(
        "{metric} at position {}: {:.4} (parts sum to {:.4})",
        a.position, a.logit, a.total
    );
    for p in a.ranked().into_iter().take(args.top) {
        println!("  {:<16} {:>+9.4}", p.name, p.value);
    }
    Ok(())
}
