//! `scalpel hooks`: every hook point of the model with the shape of its activation, symbolic
//! (`[b, p, 576]`) unless a batch size or sequence length is given.

use std::fmt;
use std::io::Write;

use anyhow::Result;
use scalpel_core::HookPoint;
use scalpel_models::transformer::Model;
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;

/// Options of `scalpel hooks`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch size to put in the shapes instead of `b`.
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Sequence length to put in the shapes instead of `p`.
    #[arg(long, value_name = "P")]
    pub seq: Option<usize>,
}

/// One dimension of an activation: the batch, the sequence, or a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Batch,
    Pos,
    Size(usize),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => write!(f, "b"),
            Dim::Pos => write!(f, "p"),
            Dim::Size(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Dim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Dim::Batch => s.serialize_str("b"),
            Dim::Pos => s.serialize_str("p"),
            Dim::Size(n) => s.serialize_u64(*n as u64),
        }
    }
}

/// The shape of `hp`'s activation with the batch and sequence dimensions named, found by asking
/// the model for the shape at three (batch, seq) pairs and seeing which dimensions follow which.
pub fn symbolic_shape(model: &Model, hp: HookPoint) -> Vec<Dim> {
    let base = model.hook_shape(hp, 2, 3);
    let more_batch = model.hook_shape(hp, 4, 3);
    let more_pos = model.hook_shape(hp, 2, 5);
    base.iter()
        .zip(more_batch.iter().zip(&more_pos))
        .map(|(n, (nb, np))| match (n != nb, n != np) {
            (true, _) => Dim::Batch,
            (_, true) => Dim::Pos,
            _ => Dim::Size(*n),
        })
        .collect()
}

/// `symbolic_shape` with the batch and/or sequence filled in where given.
fn shape(model: &Model, hp: HookPoint, batch: Option<usize>, seq: Option<usize>) -> Vec<Dim> {
    symbolic_shape(model, hp)
        .into_iter()
        .map(|d| match (d, batch, seq) {
            (Dim::Batch, Some(b), _) => Dim::Size(b),
            (Dim::Pos, _, Some(p)) => Dim::Size(p),
            _ => d,
        })
        .collect()
}

/// `[b, p, 576]`
pub fn shape_string(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(Dim::to_string).collect();
    format!("[{}]", dims.join(", "))
}

#[derive(Serialize)]
struct Report {
    model: String,
    hooks: Vec<Entry>,
}

#[derive(Serialize)]
struct Entry {
    name: String,
    shape: Vec<Dim>,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let hooks = model
        .hook_points()
        .into_iter()
        .map(|hp| Entry {
            name: hp.to_string(),
            shape: shape(model, hp, args.batch, args.seq),
        })
        .collect();
    let report = Report {
        model: args.model.model,
        hooks,
    };
    if json {
        return print_json(&report);
    }
    let mut out = std::io::stdout().lock();
    let width = report.hooks.iter().map(|e| e.name.len()).max().unwrap_or(0);
    for e in &report.hooks {
        writeln!(out, "{:<width$}  {}", e.name, shape_string(&e.shape))?;
    }
    Ok(())
}
