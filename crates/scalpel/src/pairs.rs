//! `scalpel pairs`: datasets of clean/corrupt prompt pairs for activation patching. Generates
//! Indirect Object Identification or factual-recall pairs as JSONL, or checks that a JSONL file
//! of pairs tokenizes into something patching can use.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use scalpel_circuits::pairs::{
    by_length, factual, ioi_with, read_jsonl, tokenize, write_jsonl, write_jsonl_to, Corruption,
    IoiOptions, PromptPair,
};
use scalpel_models::tokenizer::Tokenizer;
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;

/// Pairs subcommands.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Indirect Object Identification pairs ("When Mary and John went to the store, John gave a
    /// drink to" → " Mary"), from 15 templates, with names, places and objects that are one token
    /// in the model's tokenizer.
    Ioi {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        out: Generate,
        /// The corrupt prompt: `abc` replaces all three names with fresh ones (Wang et al.'s
        /// p_ABC); `s2` replaces only the subject's second mention.
        #[arg(long, default_value = "abc")]
        corruption: Corruption,
    },
    /// Factual-recall pairs ("The capital city of France is" → " Paris" against the same
    /// prompt about Japan → " Tokyo"): capitals, languages, landmarks and opposites.
    Factual {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        out: Generate,
    },
    /// Tokenize every pair of a JSONL file and report the count and token lengths, or the first
    /// pair that patching cannot use and why.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        /// The JSONL file: one {"clean", "corrupt", "answer", "wrong"} object per line.
        file: PathBuf,
        /// Pairs shown.
        #[arg(long, default_value_t = 3)]
        show: usize,
    },
}

/// Flags shared by the generators.
#[derive(clap::Args, Debug)]
pub struct Generate {
    /// Number of pairs.
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    /// Sampling seed: the same seed gives the same pairs, and the first k pairs do not depend on
    /// `--n`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the pairs to this JSONL file (atomically) and print a summary; without it the pairs
    /// go to stdout as JSONL (even with --json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What `--json` prints.
#[derive(Serialize)]
struct Summary<'a> {
    file: &'a Path,
    pairs: usize,
    /// Token lengths and how many pairs have each.
    lengths: Vec<Length>,
    /// The first pairs.
    first: &'a [PromptPair],
}

#[derive(Serialize)]
struct Length {
    tokens: usize,
    pairs: usize,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    match args.action {
        Action::Ioi {
            model,
            out,
            corruption,
        } => {
            let loaded = model.load()?;
            let opts = IoiOptions {
                n: out.n,
                seed: out.seed,
                corruption,
            };
            let pairs = ioi_with(loaded.tokenizer()?, &opts)?;
            let pairs: Vec<PromptPair> = pairs.into_iter().map(|p| p.pair).collect();
            emit(loaded.tokenizer()?, &pairs, &out, json)
        }
        Action::Factual { model, out } => {
            let loaded = model.load()?;
            let pairs = factual(loaded.tokenizer()?, out.n, out.seed)?;
            emit(loaded.tokenizer()?, &pairs, &out, json)
        }
        Action::Check { model, file, show } => {
            let pairs = read_jsonl(&file)?;
            let loaded = model.load()?;
            summarise(loaded.tokenizer()?, &file, &pairs, show, json)
                .with_context(|| format!("checking {}", file.display()))
        }
    }
}

/// Writes generated pairs to `--out` and summarises them, or streams them to stdout.
fn emit(tok: &Tokenizer, pairs: &[PromptPair], out: &Generate, json: bool) -> Result<()> {
    let Some(path) = &out.out else {
        let mut stdout = std::io::stdout().lock();
        write_jsonl_to(&mut stdout, pairs)?;
        stdout.flush()?;
        return Ok(());
    };
    write_jsonl(path, pairs)?;
    summarise(tok, path, pairs, 1, json)
}

/// Prints the count and token lengths of `pairs` and the first `show` of them; fails on the
/// first pair that does not tokenize.
fn summarise(
    tok: &Tokenizer,
    file: &Path,
    pairs: &[PromptPair],
    show: usize,
    json: bool,
) -> Result<()> {
    let tokens = tokenize(tok, pairs)?;
    let lengths: Vec<Length> = by_length(&tokens)
        .into_iter()
        .map(|(tokens, group)| Length {
            tokens,
            pairs: group.len(),
        })
        .collect();
    let first = &pairs[..show.min(pairs.len())];
    if json {
        return print_json(&Summary {
            file,
            pairs: pairs.len(),
            lengths,
            first,
        });
    }
    let lengths: Vec<String> = lengths
        .iter()
        .map(|l| format!("{} ({})", l.tokens, l.pairs))
        .collect();
    println!(
        "{}: {} pairs, all usable; tokens per prompt (pairs): {}",
        file.display(),
        pairs.len(),
        lengths.join(", ")
    );
    for (i, p) in first.iter().enumerate() {
        println!("{:>3}. clean   {:?} → {:?}", i + 1, p.clean, p.answer);
        println!("     corrupt {:?} → {:?}", p.corrupt, p.wrong);
    }
    Ok(())
}
