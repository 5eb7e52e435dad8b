//! The report folder of a grokking run: metrics per evaluation point and progress measures per
//! checkpoint as JSON and CSV, and the plots that show the three phases (memorisation, circuit
//! formation, clean-up) and the Fourier mechanism.

use serde::{Deserialize, Serialize};

use super::{key_frequencies, progress, GrokConfig, Point, Progress, Run};
use crate::diagnose::{diagnose, Diagnosis};
use crate::plot::{self, BarPlot, LinePlot, Series};
use crate::report::Report;
use crate::{checkpoint, Result};

/// The progress measures at one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointProgress {
    pub epoch: usize,
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    #[serde(flatten)]
    pub progress: Progress,
}

/// What the run showed, in one JSON object (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub config: GrokConfig,
    pub final_point: Option<Point>,
    /// First evaluated epoch with train accuracy ≥ 0.99.
    pub memorised_at: Option<usize>,
    /// First evaluated epoch with test accuracy ≥ 0.99.
    pub generalised_at: Option<usize>,
    /// Key frequencies of the final embedding (most energetic first).
    pub key_frequencies: Vec<usize>,
    pub checkpoints: Vec<CheckpointProgress>,
    pub diagnosis: Diagnosis,
}

/// Writes the report of `run` into `out` and returns its summary.
pub fn write(cfg: &GrokConfig, run: &Run, out: &Report) -> Result<Summary> {
    let p = cfg.p;
    let first = |f: &dyn Fn(&Point) -> bool| run.points.iter().find(|x| f(x)).map(|x| x.epoch);
    let memorised_at = first(&|x| x.train_acc >= 0.99);
    let generalised_at = first(&|x| x.test_acc >= 0.99);

    // Key frequencies from the final model; the progress measures of every checkpoint use them,
    // as the paper does.
    let final_probe = progress(&run.model, &run.data, &[], 5)?;
    let key = key_frequencies(&final_probe.embed_energy, 3.0);
    let mut checkpoints = Vec::new();
    let mut model = cfg.build()?;
    for (epoch, path) in &run.checkpoints {
        model.set_params(&checkpoint::load(path)?.params())?;
        let point = super::evaluate(&model, &run.data, *epoch)?;
        checkpoints.push(CheckpointProgress {
            epoch: *epoch,
            train_loss: point.train_loss,
            test_loss: point.test_loss,
            test_acc: point.test_acc,
            progress: progress(&model, &run.data, &key, 5)?,
        });
    }
    let diagnosis = diagnose(
        "final",
        &run.model,
        &run.data,
        run.points.last().map(|x| x.epoch),
    )?;
    let summary = Summary {
        config: cfg.clone(),
        final_point: run.points.last().cloned(),
        memorised_at,
        generalised_at,
        key_frequencies: key.clone(),
        checkpoints,
        diagnosis,
    };

    out.write_json("summary.json", &summary)?;
    out.write_json("metrics.json", &run.points)?;
    let rows: Vec<Vec<f64>> = run
        .points
        .iter()
        .map(|x| {
            vec![
                x.epoch as f64,
                x.train_loss,
                x.train_acc,
                x.test_loss,
                x.test_acc,
                x.weight_norm2,
            ]
        })
        .collect();
    out.write_csv(
        "metrics.csv",
        &[
            "epoch",
            "train_loss",
            "train_acc",
            "test_loss",
            "test_acc",
            "weight_norm2",
        ],
        &rows,
    )?;
    let rows: Vec<Vec<f64>> = summary
        .checkpoints
        .iter()
        .map(|c| {
            vec![
                c.epoch as f64,
                c.train_loss,
                c.test_loss,
                c.test_acc,
                c.progress.restricted_loss,
                c.progress.excluded_loss,
                c.progress.gini_embed,
                c.progress.gini_logit_map,
                c.progress.top_share,
                c.progress.weight_norm2,
            ]
        })
        .collect();
    out.write_csv(
        "progress.csv",
        &[
            "epoch",
            "train_loss",
            "test_loss",
            "test_acc",
            "restricted_loss",
            "excluded_loss",
            "gini_embed",
            "gini_logit_map",
            "top5_share",
            "weight_norm2",
        ],
        &rows,
    )?;
    let spectrum: Vec<Vec<f64>> = final_probe
        .embed_energy
        .iter()
        .zip(&final_probe.logit_map_energy)
        .enumerate()
        .map(|(i, (e, l))| vec![(i + 1) as f64, *e, *l, key.contains(&(i + 1)) as u8 as f64])
        .collect();
    out.write_csv(
        "spectrum.csv",
        &["frequency", "embed_energy", "logit_map_energy", "key"],
        &spectrum,
    )?;

    // Plots.
    let epochs: Vec<f64> = run.points.iter().map(|x| x.epoch as f64).collect();
    let col = |f: fn(&Point) -> f64| run.points.iter().map(f).collect::<Vec<f64>>();
    let mut markers = Vec::new();
    if let Some(e) = memorised_at {
        markers.push((e as f64, "train acc ≥ 0.99".to_string()));
    }
    if let Some(e) = generalised_at {
        markers.push((e as f64, "test acc ≥ 0.99".to_string()));
    }
    plot::line_plot(
        &out.path("loss.svg"),
        &LinePlot {
            title: &format!("Grokking a + b mod {p}: loss"),
            x_label: "epoch",
            y_label: "cross-entropy",
            log_y: true,
            series: vec![
                Series {
                    name: "train".into(),
                    x: epochs.clone(),
                    y: col(|x| x.train_loss),
                },
                Series {
                    name: "test".into(),
                    x: epochs.clone(),
                    y: col(|x| x.test_loss),
                },
            ],
            markers: markers.clone(),
            ..Default::default()
        },
    )?;
    plot::line_plot(
        &out.path("accuracy.svg"),
        &LinePlot {
            title: &format!("Grokking a + b mod {p}: accuracy (memorisation, then generalisation)"),
            x_label: "epoch",
            y_label: "accuracy",
            series: vec![
                Series {
                    name: "train".into(),
                    x: epochs.clone(),
                    y: col(|x| x.train_acc),
                },
                Series {
                    name: "test".into(),
                    x: epochs.clone(),
                    y: col(|x| x.test_acc),
                },
            ],
            markers: markers.clone(),
            hlines: vec![(1.0 / p as f64, "chance".into())],
            ..Default::default()
        },
    )?;
    let ck_epochs: Vec<f64> = summary.checkpoints.iter().map(|c| c.epoch as f64).collect();
    let ck =
        |f: fn(&CheckpointProgress) -> f64| summary.checkpoints.iter().map(f).collect::<Vec<f64>>();
    plot::line_plot(
        &out.path("progress_measures.svg"),
        &LinePlot {
            title: "Progress measures: restricted and excluded loss",
            x_label: "epoch",
            y_label: "cross-entropy",
            log_y: true,
            series: vec![
                Series {
                    name: "train".into(),
                    x: ck_epochs.clone(),
                    y: ck(|c| c.train_loss),
                },
                Series {
                    name: "test".into(),
                    x: ck_epochs.clone(),
                    y: ck(|c| c.test_loss),
                },
                Series {
                    name: "restricted (key frequencies only)".into(),
                    x: ck_epochs.clone(),
                    y: ck(|c| c.progress.restricted_loss),
                },
                Series {
                    name: "excluded (key frequencies removed)".into(),
                    x: ck_epochs.clone(),
                    y: ck(|c| c.progress.excluded_loss),
                },
            ],
            markers: markers.clone(),
            ..Default::default()
        },
    )?;
    plot::line_plot(
        &out.path("sparsity_and_norm.svg"),
        &LinePlot {
            title: "Fourier sparsity (Gini) and weight norm",
            x_label: "epoch",
            y_label: "Gini coefficient / weight norm² ÷ initial",
            series: vec![
                Series {
                    name: "Gini of W_E spectrum".into(),
                    x: ck_epochs.clone(),
                    y: ck(|c| c.progress.gini_embed),
                },
                Series {
                    name: "Gini of neuron→logit spectrum".into(),
                    x: ck_epochs.clone(),
                    y: ck(|c| c.progress.gini_logit_map),
                },
                Series {
                    name: "weight norm² (relative to first checkpoint)".into(),
                    x: ck_epochs.clone(),
                    y: {
                        let w = ck(|c| c.progress.weight_norm2);
                        let w0 = w.first().copied().unwrap_or(1.0).max(f64::MIN_POSITIVE);
                        w.iter().map(|x| x / w0).collect()
                    },
                },
            ],
            markers,
            ..Default::default()
        },
    )?;
    let labels: Vec<String> = (1..=final_probe.embed_energy.len())
        .map(|k| k.to_string())
        .collect();
    let highlight: Vec<usize> = key.iter().map(|k| k - 1).collect();
    plot::bar_plot(
        &out.path("embedding_spectrum.svg"),
        &BarPlot {
            title: "Token embedding in the Fourier basis (final model)",
            x_label: "frequency k (w = 2πk/p)",
            y_label: "energy",
            labels: labels.clone(),
            values: final_probe.embed_energy.clone(),
            highlight: highlight.clone(),
            highlight_name: "key frequencies",
            log_y: false,
        },
    )?;
    plot::bar_plot(
        &out.path("logit_map_spectrum.svg"),
        &BarPlot {
            title: "Neuron → logit map W_out·W_U in the Fourier basis (final model)",
            x_label: "frequency k",
            y_label: "energy",
            labels,
            values: final_probe.logit_map_energy.clone(),
            highlight,
            highlight_name: "key frequencies (from the embedding)",
            log_y: false,
        },
    )?;
    out.write_text("README.md", &readme(&summary))?;
    Ok(summary)
}

fn readme(s: &Summary) -> String {
    let c = &s.config;
    let fp = s.final_point.as_ref();
    let opt = |x: Option<usize>| x.map_or("not reached".to_string(), |e| format!("epoch {e}"));
    format!(
        "# Grokking a + b mod {p}\n\n\
         One-layer transformer (d_model {d}, {h} heads, d_mlp {m}, no LayerNorm), AdamW lr {lr}, \
         weight decay {wd}, {frac:.0}% of pairs for training, full batch, {ep} epochs, seed {seed}{shuffled}.\n\n\
         - memorised (train accuracy ≥ 0.99): {mem}\n\
         - generalised (test accuracy ≥ 0.99): {gen}\n\
         - final: train loss {tl:.3e}, train accuracy {ta:.3}, test loss {sl:.3e}, test accuracy {sa:.3}\n\
         - key frequencies of the embedding: {key:?}\n\
         - diagnosis from the inside (no test data): **{verdict}** (Fourier score {score:.2}, \
           restricted loss {rl:.3e}, excluded loss {el:.3e})\n\n\
         Files: `metrics.csv` (every evaluation), `progress.csv` (progress measures per checkpoint), \
         `spectrum.csv`, `summary.json`, plots `loss.svg`, `accuracy.svg`, `progress_measures.svg`, \
         `sparsity_and_norm.svg`, `embedding_spectrum.svg`, `logit_map_spectrum.svg`, and `checkpoints/`.\n",
        p = c.p,
        d = c.d_model,
        h = c.n_heads,
        m = c.d_mlp,
        lr = c.lr,
        wd = c.weight_decay,
        frac = c.frac_train * 100.0,
        ep = c.epochs,
        seed = c.seed,
        shuffled = if c.shuffle_labels { ", labels shuffled" } else { "" },
        mem = opt(s.memorised_at),
        gen = opt(s.generalised_at),
        tl = fp.map_or(f64::NAN, |x| x.train_loss),
        ta = fp.map_or(f64::NAN, |x| x.train_acc),
        sl = fp.map_or(f64::NAN, |x| x.test_loss),
        sa = fp.map_or(f64::NAN, |x| x.test_acc),
        key = s.key_frequencies,
        verdict = s.diagnosis.verdict,
        score = s.diagnosis.fourier_score,
        rl = s.diagnosis.restricted_loss,
        el = s.diagnosis.excluded_loss,
    )
}
