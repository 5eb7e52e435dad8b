//! Telling learning from cheating from the inside.
//!
//! A network that memorised its training pairs and one that found the algorithm can have the same
//! training accuracy; only held-out data separates them from the outside. For modular addition the
//! mechanism is known (Nanda et al. 2023): the generalising circuit lives in a few Fourier
//! frequencies of Z_p. So the diagnosis asks, using the training pairs and the weights only:
//! does the part of the logits along the model's own key frequencies, cos/sin(w_k(a + b)),
//! reproduce its training performance (restricted loss), and how concentrated is the embedding's
//! spectrum? A memorising network spreads its embedding over all frequencies and its restricted
//! logits are no better than chance.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::grokking::{self, key_frequencies, Dataset};
use crate::transformer::Trainable;
use crate::Result;

/// The verdict's threshold on [`Diagnosis::fourier_score`].
pub const GENERALISING_SCORE: f64 = 0.5;

/// What the inside of one model says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Diagnosis {
    pub name: String,
    pub p: usize,
    /// Epochs trained, when the checkpoint says.
    pub epoch: Option<usize>,
    pub train_loss: f64,
    pub train_acc: f64,
    /// The model's key frequencies (embedding energy ≥ 3× a flat spectrum's share).
    pub key_frequencies: Vec<usize>,
    /// Share of the embedding's energy in its 5 strongest frequencies.
    pub top5_share: f64,
    pub gini_embed: f64,
    /// Train loss with only the key-frequency part of the logits (plus each output's mean).
    pub restricted_loss: f64,
    /// Train loss with the key-frequency part removed.
    pub excluded_loss: f64,
    /// How much of the way from chance (ln p) to the actual train loss the restricted logits go:
    /// 1 = the key frequencies alone reproduce the training performance, 0 = no better than
    /// chance. Clipped to [0, 1].
    pub fourier_score: f64,
    pub weight_norm2: f64,
    /// "generalising" or "memorising".
    pub verdict: String,
    /// Held-out accuracy, reported for checking only: the verdict never reads it.
    pub held_out_acc: f64,
}

/// Diagnoses a loaded grokking model.
pub fn diagnose(
    name: &str,
    model: &Trainable,
    data: &Dataset,
    epoch: Option<usize>,
) -> Result<Diagnosis> {
    let p = data.p;
    let point = grokking::evaluate(model, data, epoch.unwrap_or(0))?;
    // Key frequencies from the model's own embedding, then the measures on training pairs.
    let probe = grokking::progress(model, data, &[], 5)?;
    let key = key_frequencies(&probe.embed_energy, 3.0);
    let prog = grokking::progress(model, data, &key, 5)?;
    let chance = (p as f64).ln();
    let span = (chance - point.train_loss).max(1e-9);
    let fourier_score = ((chance - prog.restricted_loss) / span).clamp(0.0, 1.0);
    Ok(Diagnosis {
        name: name.to_string(),
        p,
        epoch,
        train_loss: point.train_loss,
        train_acc: point.train_acc,
        key_frequencies: key,
        top5_share: prog.top_share,
        gini_embed: prog.gini_embed,
        restricted_loss: prog.restricted_loss,
        excluded_loss: prog.excluded_loss,
        fourier_score,
        weight_norm2: prog.weight_norm2,
        verdict: if fourier_score >= GENERALISING_SCORE {
            "generalising"
        } else {
            "memorising"
        }
        .into(),
        held_out_acc: point.test_acc,
    })
}

/// Loads a grokking checkpoint and diagnoses it.
pub fn diagnose_checkpoint(path: &Path) -> Result<Diagnosis> {
    let (_, model, data) = grokking::load(path)?;
    let epoch = crate::checkpoint::load(path)?.meta["epoch"]
        .as_u64()
        .map(|e| e as usize);
    diagnose(&path.display().to_string(), &model, &data, epoch)
}
