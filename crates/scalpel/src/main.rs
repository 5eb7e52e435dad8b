//! `scalpel`: the command-line workbench. One module per subcommand; each builds a typed report
//! and prints it either as a human table or, with `--json`, as one JSON object on stdout. Logs and
//! progress go to stderr.

mod ablate;
mod bench;
mod convert;
mod dashboards;
mod diagnose;
mod dla;
mod eval;
mod generate;
mod harvest;
mod heads;
mod hooks;
mod inspect;
mod ioi;
mod lens;
mod model;
mod output;
mod pairs;
mod patch;
mod progress;
mod prompt;
mod run;
mod serve;
mod steer;
mod store;
mod toy;
mod train;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// A mechanistic-interpretability workbench for transformer language models.
#[derive(Parser, Debug)]
#[command(name = "scalpel", version, about)]
struct Cli {
    /// Print machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// More logging on stderr (-v debug, -vv trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Only errors on stderr: no progress, no informational logs. `RUST_LOG` overrides.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one forward pass and show each position's top next-token predictions.
    Run(run::Args),
    /// Continue a prompt, streaming the text as it is generated.
    Generate(generate::Args),
    /// List the model's hook points and their activation shapes.
    Hooks(hooks::Args),
    /// Show the model's config, parameter count, files, tokenizer and stored tensors.
    Inspect(inspect::Args),
    /// Benchmark the model.
    Bench(bench::Args),
    /// Store activations of hook points over a corpus on disk (resumable).
    Harvest(harvest::Args),
    /// Inspect, verify or time an activation store.
    Store(store::Args),
    /// Train sparse dictionaries (SAEs, transcoders) on stored or streamed activations.
    Train(train::Args),
    /// Convert a sparsify, Gemma Scope, circuit-tracer or older SAELens dictionary to SAELens 6.x.
    Convert(convert::Args),
    /// Evaluate a sparse dictionary spliced into the model (SAELens's metrics).
    Eval(eval::Args),
    /// Grow a toy model from scratch (superposition, induction heads, grokking) and write a
    /// report folder.
    Toy(toy::Args),
    /// Tell memorisation from generalisation from the inside (grokking checkpoints).
    Diagnose(diagnose::Args),
    /// The logit lens: each layer's residual through the final norm and unembedding.
    Lens(lens::Args),
    /// Direct logit attribution: the answer's logit (difference) split over heads and MLPs.
    Dla(dla::Args),
    /// Previous-token, duplicate-token and induction scores of every head.
    Heads(heads::Args),
    /// Datasets of clean/corrupt prompt pairs: generate (IOI, factual recall) or check a JSONL.
    Pairs(pairs::Args),
    /// Activation patching (exact or attribution) over prompt pairs: residual, attention and MLP
    /// outputs by layer and position, heads, queries, keys, values and patterns.
    Patch(patch::Args),
    /// Attribution patching: every patching sweep estimated from one forward and one backward
    /// pass per pair group (`--method both` compares it with exact patching).
    Attribute(patch::Args),
    /// Ablate heads, neurons, MLPs or SAE latents (zero, mean or resample) and measure the effect.
    Ablate(ablate::Args),
    /// Steer generation with a vector added to the residual stream (ActAdd, mean difference, SAE
    /// feature clamping), with a coefficient sweep that shows side effects.
    Steer(steer::Args),
    /// The indirect-object-identification case study: performance, patching, the heads that
    /// carry the answer, ablation, attribution against exact patching; a report folder.
    Ioi(ioi::Args),
    /// Feature dashboards for every latent of a dictionary, in one streaming pass over an
    /// activation store or a corpus, kept in a SQLite database (resumable).
    Dashboards(dashboards::Args),
    /// The web app and its JSON API (and Neuronpedia's inference protocol), offline, on
    /// 127.0.0.1 by default.
    Serve(serve::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let json = cli.json;
    let result = match cli.command {
        Command::Run(args) => run::run(args, json),
        Command::Generate(args) => generate::run(args, json),
        Command::Hooks(args) => hooks::run(args, json),
        Command::Inspect(args) => inspect::run(args, json),
        Command::Bench(args) => bench::run(args, json),
        Command::Harvest(args) => harvest::run(args, json),
        Command::Store(args) => store::run(args, json),
        Command::Train(args) => train::run(args, json),
        Command::Convert(args) => convert::run(args, json),
        Command::Eval(args) => eval::run(args, json),
        Command::Toy(args) => toy::run(args, json),
        Command::Diagnose(args) => diagnose::run(args, json),
        Command::Lens(args) => lens::run(args, json),
        Command::Dla(args) => dla::run(args, json),
        Command::Heads(args) => heads::run(args, json),
        Command::Pairs(args) => pairs::run(args, json),
        Command::Patch(args) => patch::run(args, json),
        Command::Attribute(args) => patch::run_attribute(args, json),
        Command::Ablate(args) => ablate::run(args, json),
        Command::Steer(args) => steer::run(args, json),
        Command::Ioi(args) => ioi::run(args, json),
        Command::Dashboards(args) => dashboards::run(args, json),
        Command::Serve(args) => serve::run(args, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`scalpel hooks | head -1`) is not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// A tracing subscriber on stderr: info for scalpel's crates and warn for others by default.
fn init_logging(verbose: u8, quiet: bool) {
    let ours = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let others = if quiet { "error" } else { "warn" };
    let default = format!("{others},scalpel={ours},scalpel_models={ours},scalpel_core={ours}");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| progress::LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .init();
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, leaving out a cause whose text its parent already
/// quotes (library errors often print their source inside their own message). Only the first line
/// of each message is kept: candle appends a backtrace after a newline when `RUST_BACKTRACE` is set.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let msg = text.lines().next().unwrap_or_default().trim_end();
        if msg.is_empty() || line.contains(msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(msg);
    }
    line
}
