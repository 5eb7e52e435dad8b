//! Report files of the superposition experiments: per-instance weights and measures as JSON and
//! CSV, and the plots of the paper's figures (WᵀW and bias per sparsity, feature norms and
//! superposition, dimensionality against sparsity, the pentagon, the two-feature phase diagram).

use super::{InstanceAnalysis, PhaseDiagram, Trained};
use crate::plot::{self, BarPlot, Heatmap, LinePlot, Series};
use crate::report::Report;
use crate::Result;

fn prob_label(p: f64) -> String {
    format!("1−S = {p:.3}")
}

/// The loss curve of a run, `loss_{name}.csv` and `.svg`.
pub fn losses(out: &Report, name: &str, run: &Trained) -> Result<()> {
    let rows: Vec<Vec<f64>> = run.losses.iter().map(|&(s, l)| vec![s as f64, l]).collect();
    out.write_csv(&format!("loss_{name}.csv"), &["step", "loss"], &rows)?;
    plot::line_plot(
        &out.path(&format!("loss_{name}.svg")),
        &LinePlot {
            title: &format!("Training loss ({name}), summed over instances"),
            x_label: "step",
            y_label: "loss",
            log_y: true,
            series: vec![Series {
                name: "loss".into(),
                x: rows.iter().map(|r| r[0]).collect(),
                y: rows.iter().map(|r| r[1]).collect(),
            }],
            ..Default::default()
        },
    )
}

/// Per-feature measures of every instance as CSV (`{name}_features.csv`) and the analyses as
/// JSON (`{name}.json`).
pub fn tables(out: &Report, name: &str, analyses: &[InstanceAnalysis]) -> Result<()> {
    out.write_json(&format!("{name}.json"), &analyses)?;
    let mut rows = Vec::new();
    for (i, a) in analyses.iter().enumerate() {
        for f in 0..a.norms.len() {
            rows.push(vec![
                i as f64,
                a.feature_prob,
                f as f64,
                a.norms[f],
                a.superposition[f],
                a.dimensionality[f],
                a.bias[f],
            ]);
        }
    }
    out.write_csv(
        &format!("{name}_features.csv"),
        &[
            "instance",
            "feature_prob",
            "feature",
            "norm",
            "superposition",
            "dimensionality",
            "bias",
        ],
        &rows,
    )?;
    let rows: Vec<Vec<f64>> = analyses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            vec![
                i as f64,
                a.feature_prob,
                1.0 / a.feature_prob,
                a.dims_per_feature,
                a.n_represented as f64,
            ]
        })
        .collect();
    out.write_csv(
        &format!("{name}_instances.csv"),
        &[
            "instance",
            "feature_prob",
            "inv_density",
            "dims_per_feature",
            "n_represented",
        ],
        &rows,
    )?;
    Ok(())
}

/// WᵀW and bias heatmaps per instance, and feature norm / superposition bars.
pub fn importance_sweep(out: &Report, analyses: &[InstanceAnalysis]) -> Result<()> {
    tables(out, "importance_sweep", analyses)?;
    for (i, a) in analyses.iter().enumerate() {
        let n = a.bias.len();
        let labels: Vec<String> = (0..n).map(|f| f.to_string()).collect();
        plot::heatmap(
            &out.path(&format!("wtw_{i}.svg")),
            &Heatmap {
                title: &format!(
                    "WᵀW, {} (features by decreasing importance)",
                    prob_label(a.feature_prob)
                ),
                values: &a.wtw,
                row_labels: Some(labels.clone()),
                col_labels: Some(labels.clone()),
                x_label: "feature",
                y_label: "feature",
                diverging: true,
            },
        )?;
        plot::heatmap(
            &out.path(&format!("bias_{i}.svg")),
            &Heatmap {
                title: &format!("bias b, {}", prob_label(a.feature_prob)),
                values: std::slice::from_ref(&a.bias),
                row_labels: Some(vec!["b".into()]),
                col_labels: Some(labels.clone()),
                x_label: "feature",
                y_label: "",
                diverging: true,
            },
        )?;
        let superposed: Vec<usize> = (0..n).filter(|&f| a.superposition[f] > 0.1).collect();
        plot::bar_plot(
            &out.path(&format!("norms_{i}.svg")),
            &BarPlot {
                title: &format!(
                    "‖W_i‖ per feature, {} (red: in superposition)",
                    prob_label(a.feature_prob)
                ),
                x_label: "feature",
                y_label: "‖W_i‖",
                labels,
                values: a.norms.clone(),
                highlight: superposed,
                highlight_name: "Σ_j≠i (Ŵ_i·W_j)² > 0.1",
                log_y: false,
            },
        )?;
    }
    Ok(())
}

/// Dimensions per feature D* and per-feature dimensionality against 1/(1 − S).
pub fn dimensionality_sweep(out: &Report, analyses: &[InstanceAnalysis]) -> Result<()> {
    tables(out, "dimensionality_sweep", analyses)?;
    let x: Vec<f64> = analyses.iter().map(|a| 1.0 / a.feature_prob).collect();
    let series = vec![Series {
        name: "D* = m / ‖W‖²_F".into(),
        x: x.clone(),
        y: analyses.iter().map(|a| a.dims_per_feature).collect(),
    }];
    // (Each feature's D_i is in dimensionality_sweep_features.csv.)
    let hlines = [
        (1.0, "1"),
        (0.75, "3/4"),
        (2.0 / 3.0, "2/3"),
        (0.5, "1/2"),
        (0.4, "2/5"),
        (0.375, "3/8"),
    ]
    .iter()
    .map(|&(v, l)| (v, l.to_string()))
    .collect();
    plot::line_plot(
        &out.path("dimensionality.svg"),
        &LinePlot {
            title: "Dimensions per feature as sparsity grows (sticky fractions dashed)",
            x_label: "1 / (1 − S)",
            y_label: "dimensions per feature",
            log_x: true,
            series,
            hlines,
            ..Default::default()
        },
    )
}

/// The 5 features of the first instance as directions in the plane.
pub fn pentagon(out: &Report, analyses: &[InstanceAnalysis]) -> Result<()> {
    tables(out, "pentagon", analyses)?;
    if let Some(a) = analyses.first() {
        if a.w.len() == 2 {
            let vectors: Vec<(f64, f64)> =
                (0..a.w[0].len()).map(|f| (a.w[0][f], a.w[1][f])).collect();
            let labels: Vec<String> = (0..vectors.len())
                .map(|f| format!("feature {f} (D = {:.2})", a.dimensionality[f]))
                .collect();
            plot::directions_2d(
                &out.path("pentagon.svg"),
                &format!(
                    "5 sparse features in 2 dimensions ({})",
                    prob_label(a.feature_prob)
                ),
                &vectors,
                &labels,
            )?;
        }
    }
    Ok(())
}

/// The two-feature phase diagram.
pub fn phase_diagram(out: &Report, pd: &PhaseDiagram) -> Result<()> {
    out.write_json("phase_diagram.json", pd)?;
    let mut rows = Vec::new();
    for (r, &imp) in pd.importances.iter().enumerate() {
        for (c, &dens) in pd.densities.iter().enumerate() {
            rows.push(vec![
                imp,
                dens,
                pd.grid[r][c] as f64,
                pd.w[r][c][0],
                pd.w[r][c][1],
                pd.bias[r][c][0],
                pd.bias[r][c][1],
                pd.loss[r][c],
            ]);
        }
    }
    out.write_csv(
        "phase_diagram.csv",
        &[
            "importance_2",
            "density",
            "phase",
            "w1",
            "w2",
            "b1",
            "b2",
            "loss",
        ],
        &rows,
    )?;
    let categories: Vec<&str> = pd.categories.iter().map(|s| s.as_str()).collect();
    // Rows bottom to top by importance; columns left to right by sparsity (1/(1 − S)).
    let x_values: Vec<f64> = pd.densities.iter().map(|d| 1.0 / d).collect();
    plot::phase_diagram(
        &out.path("phase_diagram.svg"),
        &plot::PhaseDiagram {
            title: "Two features, one dimension: what happens to feature 2",
            x_label: "1 / (1 − S) (sparser →)",
            y_label: "relative importance of feature 2",
            x_values: &x_values,
            y_values: &pd.importances,
            cells: &pd.grid,
            categories: &categories,
        },
    )
}
