//! `scalpel generate`: continues a prompt with the KV cache, greedy or sampled, streaming the
//! text to stdout as each token arrives.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use scalpel_core::Hooks;
use scalpel_models::generation::{generate, GenerateOptions, Generation, StopReason};
use scalpel_models::tokenizer::Tokenizer;
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;
use crate::prompt;

/// Options of `scalpel generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities sum to P (nucleus sampling).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message before the user's (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Tokens that end generation, as spelled in the vocabulary or as text that is one token
    /// (`<|im_end|>`); default: the tokenizer's end-of-sequence tokens.
    #[arg(long, value_name = "TOKEN", num_args = 1..)]
    pub stop: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    prompt: String,
    prompt_tokens: usize,
    text: String,
    tokens: Vec<u32>,
    stop_reason: StopReason,
    tokens_per_second: f64,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let loaded = args.model.load()?;
    let tok = loaded.tokenizer()?;
    let ids = prompt::encode(tok, &args.prompt, args.chat, args.system.as_deref())?;
    let stop_tokens = if args.stop.is_empty() {
        tok.eos_ids().to_vec()
    } else {
        args.stop
            .iter()
            .map(|s| stop_id(tok, s))
            .collect::<Result<_>>()?
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_tokens,
    };

    let mut stream = TextStream::new(tok, ids.last().copied());
    let mut text = String::new();
    let mut out = std::io::stdout().lock();
    // The callback cannot return an error: remember the first one and stop writing.
    let mut write_err: Option<std::io::Error> = None;
    let start = Instant::now();
    let generation = generate(&loaded.model, &ids, &opts, &mut Hooks::new(), |id| {
        let piece = stream.push(id);
        text.push_str(&piece);
        if !json && write_err.is_none() && !piece.is_empty() {
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let rest = stream.finish();
    text.push_str(&rest);
    let tokens_per_second = generation.tokens.len() as f64 / secs.max(1e-9);
    if json {
        drop(out);
        log_speed(&generation, secs, tokens_per_second);
        return print_json(&Report {
            model: args.model.model,
            prompt: args.prompt,
            prompt_tokens: ids.len(),
            text,
            tokens: generation.tokens,
            stop_reason: generation.stop_reason,
            tokens_per_second,
        });
    }
    writeln!(out, "{rest}")?;
    drop(out);
    log_speed(&generation, secs, tokens_per_second);
    Ok(())
}

/// The speed line on stderr, after the text so that the two do not interleave.
fn log_speed(generation: &Generation, secs: f64, tokens_per_second: f64) {
    let n = generation.tokens.len();
    tracing::info!(
        "{n} tokens in {secs:.2} s ({tokens_per_second:.1} tokens/s), stopped by {}",
        match generation.stop_reason {
            StopReason::Length => "--max-new-tokens",
            StopReason::StopToken => "a stop token",
            StopReason::Context => "the end of the context",
        }
    );
}

/// The id of a `--stop` token: a vocabulary entry, or text that encodes to exactly one token.
fn stop_id(tok: &Tokenizer, s: &str) -> Result<u32> {
    if let Some(id) = tok.token_to_id(s) {
        return Ok(id);
    }
    match tok.encode(s, false)?.as_slice() {
        [id] => Ok(*id),
        ids => bail!(
            "--stop {s:?} is not one token (it encodes to {} tokens)",
            ids.len()
        ),
    }
}

/// Incremental detokenisation. Decoding tokens one by one breaks multi-byte characters split
/// across tokens and the spaces some decoders strip at the start of a text, so each step decodes
/// a short window that begins one token before the new ones and prints only what the new tokens
/// added, holding back text that ends in an incomplete character (text-generation-inference's
/// scheme).
struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens before this index are already printed.
    read: usize,
}

impl<'a> TextStream<'a> {
    /// `context`: the last prompt token, so that the first new token decodes as it would
    /// mid-text (" Paris", not "Paris").
    fn new(tok: &'a Tokenizer, context: Option<u32>) -> Self {
        let ids: Vec<u32> = context.into_iter().collect();
        let read = ids.len();
        TextStream {
            tok,
            ids,
            prefix: 0,
            read,
        }
    }

    /// The text `id` completes, possibly empty.
    fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let before = self.decode(self.prefix, self.read);
        let now = self.decode(self.prefix, self.ids.len());
        if now.len() <= before.len()
            || now.ends_with('\u{FFFD}')
            || !now.is_char_boundary(before.len())
        {
            return String::new();
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        now[before.len()..].to_string()
    }

    /// Whatever is still held back (an incomplete character at the very end).
    fn finish(&mut self) -> String {
        let before = self.decode(self.prefix, self.read);
        let now = self.decode(self.prefix, self.ids.len());
        self.read = self.ids.len();
        now.get(before.len()..).unwrap_or_default().to_string()
    }

    fn decode(&self, from: usize, to: usize) -> String {
        // Special tokens (the end-of-turn token that stops a chat reply) are not shown. Decoding
        // known ids cannot fail; an error would only lose display text.
        self.tok
            .decode(&self.ids[from..to], true)
            .unwrap_or_default()
    }
}
