//! The report folder of an induction-head run: losses and every head's scores per evaluation as
//! JSON and CSV, the phase change, the ablation table and the composition scores, with plots.

use serde::{Deserialize, Serialize};

use super::{analyse, Analysis, InductionConfig, PhaseChange, Point, Run};
use crate::plot::{self, Heatmap, LinePlot, Series};
use crate::report::Report;
use crate::Result;

/// What the run showed (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub config: InductionConfig,
    pub phase: PhaseChange,
    pub final_point: Option<Point>,
    pub analysis: Analysis,
}

/// Writes the report of `run` into `out`.
pub fn write(cfg: &InductionConfig, run: &Run, out: &Report) -> Result<Summary> {
    let last = run.points.last().map_or(0, |p| p.step);
    let analysis = analyse(cfg, &run.model.model, last)?;
    let summary = Summary {
        config: cfg.clone(),
        phase: run.phase,
        final_point: run.points.last().cloned(),
        analysis,
    };
    out.write_json("summary.json", &summary)?;
    out.write_json("metrics.json", &run.points)?;
    let (l, h) = (cfg.n_layers, cfg.n_heads);
    let mut header = vec![
        "step".to_string(),
        "loss".into(),
        "first_half_loss".into(),
        "second_half_loss".into(),
    ];
    for layer in 0..l {
        for head in 0..h {
            header.push(format!("prev_token_L{layer}H{head}"));
        }
    }
    for layer in 0..l {
        for head in 0..h {
            header.push(format!("induction_L{layer}H{head}"));
        }
    }
    let rows: Vec<Vec<f64>> = run
        .points
        .iter()
        .map(|p| {
            let mut r = vec![p.step as f64, p.loss, p.first_half_loss, p.second_half_loss];
            r.extend(p.prev_token_scores.iter().flatten());
            r.extend(p.induction_scores.iter().flatten());
            r
        })
        .collect();
    let header_refs: Vec<&str> = header.iter().map(|s| s.as_str()).collect();
    out.write_csv("metrics.csv", &header_refs, &rows)?;
    let abl: Vec<Vec<f64>> = summary
        .analysis
        .ablation
        .iter()
        .map(|r| {
            vec![
                r.layer as f64,
                r.head as f64,
                r.losses.loss,
                r.losses.first_half,
                r.losses.second_half,
                r.delta_second_half,
            ]
        })
        .collect();
    out.write_csv(
        "ablation.csv",
        &[
            "layer",
            "head",
            "loss",
            "first_half_loss",
            "second_half_loss",
            "delta_second_half",
        ],
        &abl,
    )?;

    // Plots.
    let steps: Vec<f64> = run.points.iter().map(|p| p.step as f64).collect();
    let mut markers = Vec::new();
    if let Some(s) = run.phase.loss_step {
        markers.push((s as f64, "in-context loss < ln(vocab)/2".to_string()));
    }
    if let Some(s) = run.phase.induction_step {
        markers.push((s as f64, "induction score > 0.5".to_string()));
    }
    plot::line_plot(
        &out.path("loss.svg"),
        &LinePlot {
            title: "Loss on random sequences repeated once: the phase change",
            x_label: "step",
            y_label: "cross-entropy",
            series: vec![
                Series {
                    name: "first half (unpredictable)".into(),
                    x: steps.clone(),
                    y: run.points.iter().map(|p| p.first_half_loss).collect(),
                },
                Series {
                    name: "second half (in-context)".into(),
                    x: steps.clone(),
                    y: run.points.iter().map(|p| p.second_half_loss).collect(),
                },
            ],
            markers: markers.clone(),
            hlines: vec![
                ((cfg.vocab as f64).ln(), "ln(vocab)".into()),
                ((cfg.vocab as f64).ln() / 2.0, "ln(vocab)/2".into()),
            ],
            ..Default::default()
        },
    )?;
    let head_series = |f: &dyn Fn(&Point, usize, usize) -> f64| -> Vec<Series> {
        let mut v = Vec::new();
        for layer in 0..l {
            for head in 0..h {
                v.push(Series {
                    name: format!("L{layer}H{head}"),
                    x: steps.clone(),
                    y: run.points.iter().map(|p| f(p, layer, head)).collect(),
                });
            }
        }
        v
    };
    let chance = super::chance_scores(cfg.half);
    plot::line_grid(
        &out.path("head_scores.svg"),
        "Head scores during training",
        &[
            LinePlot {
                title: "previous-token score",
                x_label: "step",
                y_label: "mean attention to i − 1",
                series: head_series(&|p, a, b| p.prev_token_scores[a][b]),
                markers: markers.clone(),
                hlines: vec![(chance.0, "uniform".into())],
                ..Default::default()
            },
            LinePlot {
                title: "induction (prefix-matching) score",
                x_label: "step",
                y_label: "attention to the token after the earlier copy",
                series: head_series(&|p, a, b| p.induction_scores[a][b]),
                markers,
                hlines: vec![(chance.1, "uniform".into())],
                ..Default::default()
            },
        ],
        2,
    )?;
    if let Some(c) = &summary.analysis.composition {
        for (name, m) in [("k", &c.k), ("q", &c.q), ("v", &c.v)] {
            plot::heatmap(
                &out.path(&format!("{name}_composition.svg")),
                &Heatmap {
                    title: &format!(
                        "{}-composition, layer 0 heads → layer 1 heads (random baseline {:.3})",
                        name.to_uppercase(),
                        c.baseline_mean
                    ),
                    values: m,
                    row_labels: Some((0..m.len()).map(|i| format!("L1H{i}")).collect()),
                    col_labels: Some(
                        (0..m.first().map_or(0, |r| r.len()))
                            .map(|i| format!("L0H{i}"))
                            .collect(),
                    ),
                    x_label: "writer (layer 0)",
                    y_label: "reader (layer 1)",
                    diverging: false,
                },
            )?;
        }
    }
    let abl_matrix: Vec<Vec<f64>> = (0..l)
        .map(|layer| {
            (0..h)
                .map(|head| {
                    summary
                        .analysis
                        .ablation
                        .iter()
                        .find(|r| r.layer == layer && r.head == head)
                        .map_or(f64::NAN, |r| r.delta_second_half)
                })
                .collect()
        })
        .collect();
    plot::heatmap(
        &out.path("ablation.svg"),
        &Heatmap {
            title: "Rise of in-context loss when each head is zero-ablated (hook_z)",
            values: &abl_matrix,
            row_labels: Some((0..l).map(|i| format!("layer {i}")).collect()),
            col_labels: Some((0..h).map(|i| format!("head {i}")).collect()),
            x_label: "head",
            y_label: "layer",
            diverging: true,
        },
    )?;
    out.write_text("README.md", &text(&summary))?;
    Ok(summary)
}

/// A short account of the run.
pub fn text(s: &Summary) -> String {
    let c = &s.config;
    let a = &s.analysis;
    let p = &a.clean;
    let opt = |x: Option<usize>| x.map_or("not reached".to_string(), |e| format!("step {e}"));
    let (pl, ph) = a.prev_token_head;
    let (il, ih) = a.induction_head;
    let ind_abl = a
        .ablation
        .iter()
        .find(|r| (r.layer, r.head) == a.induction_head)
        .map_or(f64::NAN, |r| r.delta_second_half);
    let k_comp = a
        .composition
        .as_ref()
        .and_then(|m| m.k.get(ih).and_then(|row| row.get(ph)).copied())
        .map_or("n/a (one layer)".to_string(), |v| {
            format!(
                "{v:.3} (random baseline {:.3} ± {:.3})",
                a.composition.as_ref().map_or(0.0, |m| m.baseline_mean),
                a.composition.as_ref().map_or(0.0, |m| m.baseline_std)
            )
        });
    format!(
        "# Induction heads\n\n\
         {layers}-layer attention-only transformer (d_model {d}, {h} heads), vocab {v}, trained \
         {steps} steps on random sequences of {len} tokens in which a segment of {minseg} to {half} \
         tokens is copied to a random later place; scored on sequences of a random half of {half} \
         tokens repeated.\n\n\
         - phase change: in-context loss below ln(vocab)/2 at {ls}; an induction score above 0.5 \
           at {is}\n\
         - final losses: first half {fh:.3} (ln vocab = {lnv:.3}), second half {sh:.3}\n\
         - previous-token head L{pl}H{ph}: score {ps:.3} (uniform attention {cp:.3})\n\
         - induction head L{il}H{ih}: score {isc:.3} (uniform attention {ci:.3})\n\
         - zero-ablating L{il}H{ih} raises the in-context loss by {ind_abl:.3} nats\n\
         {composition}",
        layers = c.n_layers,
        d = c.d_model,
        h = c.n_heads,
        v = c.vocab,
        half = c.half,
        len = 2 * c.half,
        minseg = c.min_segment,
        steps = c.steps,
        ls = opt(s.phase.loss_step),
        is = opt(s.phase.induction_step),
        fh = p.first_half_loss,
        lnv = (c.vocab as f64).ln(),
        sh = p.second_half_loss,
        ps = p.prev_token_scores[pl][ph],
        cp = a.chance_prev_token,
        isc = p.induction_scores[il][ih],
        ci = a.chance_induction,
        composition = match a.induction_score_without_prev_token_head {
            Some(v) => format!(
                "- with L0H{ph} zero-ablated, L{il}H{ih}'s induction score falls to {v:.3}\n\
                 - K-composition L0H{ph} → L1H{ih}: {k_comp}\n"
            ),
            None => "- one layer: no composition is possible (the control)\n".to_string(),
        },
    )
}
