//! `scalpel ioi`: the indirect-object-identification case study (Wang et al. 2022) on any model,
//! written as a report folder: task performance, patching heatmaps, the heads whose direct
//! effect carries or suppresses the answer, their attention, ablation of the top heads against
//! random heads, and attribution patching against exact patching.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use scalpel_circuits::ablate::{self, Data, Method, Reference, Target};
use scalpel_circuits::dla::direct_logit_attribution;
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs::{self, Corruption, IoiOptions, IoiPair, TokenPair};
use scalpel_circuits::patching::{correlation, Direction, PatchGrid, Patcher, Receiver, Sweep};
use scalpel_core::{BlockHook, HookPoint};
use scalpel_models::transformer::Model;
use scalpel_toys::plot::{heatmap, Heatmap};
use scalpel_toys::report::Report;
use serde::Serialize;

use crate::model::ModelArgs;
use crate::output::print_json;
use crate::progress::CountBar;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// IOI prompts (all templates, ABC corruption).
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    /// Prompts of one template for the layer × position heatmaps.
    #[arg(long, default_value_t = 20)]
    pub position_pairs: usize,
    /// Heads reported, and ablated together, per role.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The report folder.
    #[arg(long, default_value = "ioi-report")]
    pub out: PathBuf,
}

#[derive(Serialize, Clone)]
struct HeadInfo {
    head: String,
    layer: usize,
    index: usize,
    /// Mean direct effect on the logit difference (DLA), nats.
    direct_effect: f64,
    /// Path patching to the logits (noising): normalised score (1 = no effect).
    path_to_logits: f64,
    /// Denoising patch of the head's output at every position: normalised score.
    patch_z: f64,
    /// Attention from the last token to the IO, S1 and S2 names, averaged over prompts.
    attn_io: f64,
    attn_s1: f64,
    attn_s2: f64,
}

#[derive(Serialize)]
struct AblationRow {
    what: String,
    heads: Vec<String>,
    metric_clean: f64,
    metric_ablated: f64,
    change: f64,
    /// Share of the clean logit difference lost.
    fraction_lost: f64,
}

#[derive(Serialize)]
struct Summary {
    model: String,
    n_layers: usize,
    n_heads: usize,
    pairs: usize,
    templates: usize,
    seed: u64,
    logit_diff_clean: f64,
    logit_diff_corrupt: f64,
    /// Share of prompts whose IO logit beats the S logit.
    accuracy_io_over_s: f64,
    /// Share of prompts whose top prediction is the IO name.
    top1_accuracy: f64,
    name_movers: Vec<HeadInfo>,
    negative_heads: Vec<HeadInfo>,
    ablations: Vec<AblationRow>,
    correlation_attribution_exact_z_head: Option<f64>,
    correlation_attribution_exact_resid_pre: Option<f64>,
    /// The one-template prompt used for the resid_pre heatmap and how many prompts share it.
    position_template: String,
    position_pairs: usize,
    /// The first layer at which patching the last position's residual alone restores at least
    /// half of the logit difference.
    resid_move_layer: Option<usize>,
    /// The layer where patching the S2 position restores most, and its score.
    s2_best: Option<(usize, f64)>,
    seconds: f64,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    if args.n == 0 || args.position_pairs == 0 || args.top == 0 {
        bail!("--n, --position-pairs and --top must be at least 1");
    }
    let start = Instant::now();
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    let c = model.config().clone();
    let report = Report::create(&args.out)?;
    let metric = Metric::logit_diff();

    let gen = pairs::ioi_with(
        tok,
        &IoiOptions {
            n: args.n,
            seed: args.seed,
            corruption: Corruption::Abc,
        },
    )?;
    let text: Vec<_> = gen.iter().map(|p| p.pair.clone()).collect();
    let tokens = pairs::tokenize(tok, &text)?;
    let mut templates: Vec<usize> = gen.iter().map(|p| p.template).collect();
    templates.sort_unstable();
    templates.dedup();
    eprintln!("{} IOI pairs from {} templates", gen.len(), templates.len());

    // Performance.
    let patcher = Patcher::new(model, &tokens, &metric)?;
    let per_pair = patcher.per_pair();
    let accuracy = per_pair.iter().filter(|(c, _)| *c > 0.0).count() as f64 / per_pair.len() as f64;
    let top1 = top1_accuracy(model, &tokens)?;

    // Direct logit attribution per head, averaged over prompts.
    let bar = CountBar::start(
        tokens.len() as u64,
        0,
        "direct logit attribution".into(),
        "prompts",
    );
    let mut dla = vec![vec![0.0; c.n_heads]; c.n_layers];
    for p in &tokens {
        let t = Tensor::new(p.clean.as_slice(), model.device())?.unsqueeze(0)?;
        let a = direct_logit_attribution(model, &t, None, p.answer, Some(p.wrong))?;
        for part in &a.parts {
            if let Some((l, h)) = scalpel_circuits::patching::parse_head(&part.name) {
                dla[l][h] += part.value / tokens.len() as f64;
            }
        }
        bar.inc(1);
    }
    drop(bar);

    // Patching of heads over every prompt, and attribution patching beside it.
    let progress =
        |name: &str, total: usize| CountBar::start(total as u64, 0, name.to_string(), "runs");
    let bar = progress("path patching to the logits", c.n_layers * patcher.groups());
    let path = patcher.path(&[Receiver::Logits], Direction::Noise, false, |_, _| {
        bar.inc(1)
    })?;
    drop(bar);
    let bar = progress("patching hook_z", patcher.planned_runs(Sweep::ZHead));
    let z_exact = patcher.exact(Sweep::ZHead, Direction::Denoise, |_, _| bar.inc(1))?;
    drop(bar);
    let z_attr = patcher
        .attribution(&[Sweep::ZHead], Direction::Denoise)?
        .remove(0);
    let corr_z = correlation(&z_attr.scores, &z_exact.scores);

    // Attention from the end to the names.
    let attn = attention_to_names(model, &gen, &tokens)?;

    let info = |l: usize, h: usize| HeadInfo {
        head: format!("L{l}H{h}"),
        layer: l,
        index: h,
        direct_effect: dla[l][h],
        path_to_logits: path.scores[l * c.n_heads + h],
        patch_z: z_exact.scores[l * c.n_heads + h],
        attn_io: attn[l][h][0],
        attn_s1: attn[l][h][1],
        attn_s2: attn[l][h][2],
    };
    let mut ranked: Vec<(usize, usize)> = (0..c.n_layers)
        .flat_map(|l| (0..c.n_heads).map(move |h| (l, h)))
        .collect();
    ranked.sort_by(|a, b| dla[b.0][b.1].total_cmp(&dla[a.0][a.1]));
    let name_movers: Vec<HeadInfo> = ranked
        .iter()
        .take(args.top)
        .map(|&(l, h)| info(l, h))
        .collect();
    let negative: Vec<HeadInfo> = ranked
        .iter()
        .rev()
        .take(args.top)
        .filter(|&&(l, h)| dla[l][h] < 0.0)
        .map(|&(l, h)| info(l, h))
        .collect();

    // Ablation: mean over the ABC prompts (the paper's reference distribution).
    let mean_ref = Method::Mean(Reference::Sequences(
        tokens.iter().map(|p| p.corrupt.clone()).collect(),
    ));
    let heads_of = |v: &[HeadInfo]| -> Vec<Target> {
        v.iter()
            .map(|h| Target::Head {
                layer: h.layer,
                head: h.index,
            })
            .collect()
    };
    let mut random: Vec<(usize, usize)> = ranked.clone();
    random.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed + 1));
    let random_heads: Vec<Target> = random
        .iter()
        .take(args.top)
        .map(|&(layer, head)| Target::Head { layer, head })
        .collect();
    let mut ablations = Vec::new();
    for (what, targets) in [
        (
            format!("top {} direct-effect heads", args.top),
            heads_of(&name_movers),
        ),
        (
            format!("top {} negative heads", negative.len()),
            heads_of(&negative),
        ),
        (format!("{} random heads", args.top), random_heads),
    ] {
        if targets.is_empty() {
            continue;
        }
        let e = ablate::ablate(
            model,
            &targets,
            &mean_ref,
            None,
            Data {
                pairs: Some((&tokens, &metric)),
                text: None,
            },
        )?;
        let m = e.metric.expect("pairs were given");
        ablations.push(AblationRow {
            what,
            heads: targets.iter().map(|t| t.to_string()).collect(),
            metric_clean: m.clean,
            metric_ablated: m.ablated,
            change: m.change,
            fraction_lost: -m.change / m.clean,
        });
    }

    // Layer × position patching on prompts of one template.
    let pos_set = one_template(tok, args.seed, args.position_pairs)?;
    let pos_tokens = pairs::tokenize(
        tok,
        &pos_set.iter().map(|p| p.pair.clone()).collect::<Vec<_>>(),
    )?;
    let pos_patcher = Patcher::new(model, &pos_tokens, &metric)?;
    let bar = progress(
        "patching resid_pre",
        pos_patcher.planned_runs(Sweep::ResidPre),
    );
    let resid_exact = pos_patcher.exact(Sweep::ResidPre, Direction::Denoise, |_, _| bar.inc(1))?;
    drop(bar);
    let resid_attr = pos_patcher
        .attribution(&[Sweep::ResidPre], Direction::Denoise)?
        .remove(0);
    let corr_resid = correlation(&resid_attr.scores, &resid_exact.scores);
    let roles = pos_set[0].labels();
    let mut labels = tok.token_strings(&pos_tokens[0].clean);
    for (l, r) in labels.iter_mut().zip(&roles) {
        if !r.is_empty() {
            *l = format!("{l} ({r})");
        }
    }
    let pos = pos_set[0].positions;
    let seq = pos_tokens[0].clean.len();
    let resid_move_layer = (0..c.n_layers).find(|&l| resid_exact.scores[l * seq + pos.end] >= 0.5);
    let s2_best = (0..c.n_layers)
        .map(|l| (l, resid_exact.scores[l * seq + pos.s2]))
        .max_by(|a, b| a.1.total_cmp(&b.1));

    // Plots.
    let head_labels: Vec<String> = (0..c.n_heads).map(|h| format!("H{h}")).collect();
    let layer_labels: Vec<String> = (0..c.n_layers).map(|l| format!("L{l}")).collect();
    let grid =
        |g: &[f64], cols: usize| -> Vec<Vec<f64>> { g.chunks(cols).map(|c| c.to_vec()).collect() };
    let dla_flat: Vec<f64> = dla.iter().flatten().copied().collect();
    for (file, title, values, cols, col_labels, x) in [
        (
            "dla_heads.svg",
            "Direct effect of each head on logit(IO) − logit(S), mean over prompts",
            &dla_flat,
            c.n_heads,
            &head_labels,
            "head",
        ),
        (
            "path_to_logits.svg",
            "Path patching to the logits (noising, ABC): normalised score (1 = no effect)",
            &path.scores,
            c.n_heads,
            &head_labels,
            "head",
        ),
        (
            "patch_z_heads.svg",
            "Activation patching of hook_z (denoising): normalised score",
            &z_exact.scores,
            c.n_heads,
            &head_labels,
            "head",
        ),
        (
            "attribution_z_heads.svg",
            "Attribution patching of hook_z (denoising): normalised estimate",
            &z_attr.scores,
            c.n_heads,
            &head_labels,
            "head",
        ),
        (
            "patch_resid_pre.svg",
            "Activation patching of resid_pre (denoising), one template",
            &resid_exact.scores,
            seq,
            &labels,
            "position (token)",
        ),
        (
            "attribution_resid_pre.svg",
            "Attribution patching of resid_pre (denoising), one template",
            &resid_attr.scores,
            seq,
            &labels,
            "position (token)",
        ),
    ] {
        heatmap(
            &report.path(file),
            &Heatmap {
                title,
                values: &grid(values, cols),
                row_labels: Some(layer_labels.clone()),
                col_labels: Some(col_labels.clone()),
                x_label: x,
                y_label: "layer",
                diverging: true,
            },
        )?;
    }

    let summary = Summary {
        model: args.model.model.clone(),
        n_layers: c.n_layers,
        n_heads: c.n_heads,
        pairs: tokens.len(),
        templates: templates.len(),
        seed: args.seed,
        logit_diff_clean: patcher.clean_metric(),
        logit_diff_corrupt: patcher.corrupt_metric(),
        accuracy_io_over_s: accuracy,
        top1_accuracy: top1,
        name_movers,
        negative_heads: negative,
        ablations,
        correlation_attribution_exact_z_head: corr_z,
        correlation_attribution_exact_resid_pre: corr_resid,
        position_template: pos_set[0].pair.clean.clone(),
        position_pairs: pos_tokens.len(),
        resid_move_layer,
        s2_best,
        seconds: start.elapsed().as_secs_f64(),
    };
    report.write_json("summary.json", &summary)?;
    let grids: Vec<&PatchGrid> = vec![&path, &z_exact, &z_attr, &resid_exact, &resid_attr];
    report.write_json("grids.json", &grids)?;
    report.write_json("dla_heads.json", &dla)?;
    report.write_text("README.md", &readme(&summary, &labels))?;
    if json {
        return print_json(&summary);
    }
    print!("{}", readme(&summary, &labels));
    eprintln!("report in {}", args.out.display());
    Ok(())
}

/// Share of prompts whose most likely next token is the answer.
fn top1_accuracy(model: &Model, tokens: &[TokenPair]) -> Result<f64> {
    let mut hits = 0;
    for (len, members) in pairs::by_length(tokens) {
        let flat: Vec<u32> = members
            .iter()
            .flat_map(|&i| tokens[i].clean.clone())
            .collect();
        let batch = Tensor::from_vec(flat, (members.len(), len), model.device())?;
        let logits = model.forward(&batch)?;
        let top = logits
            .narrow(1, len - 1, 1)?
            .squeeze(1)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?;
        hits += members
            .iter()
            .zip(top)
            .filter(|(&i, t)| tokens[i].answer == *t)
            .count();
    }
    Ok(hits as f64 / tokens.len() as f64)
}

/// Per head, the attention from the last token to the IO, S1 and S2 positions, averaged over
/// the clean prompts: `[layer][head][3]`.
fn attention_to_names(
    model: &Model,
    gen: &[IoiPair],
    tokens: &[TokenPair],
) -> Result<Vec<Vec<[f64; 3]>>> {
    let c = model.config();
    let mut out = vec![vec![[0.0; 3]; c.n_heads]; c.n_layers];
    for (len, members) in pairs::by_length(tokens) {
        let flat: Vec<u32> = members
            .iter()
            .flat_map(|&i| tokens[i].clean.clone())
            .collect();
        let batch = Tensor::from_vec(flat, (members.len(), len), model.device())?;
        let (_, cache) = model.run_with_cache(&batch, |p| {
            matches!(p, HookPoint::Block(_, BlockHook::Pattern))
        })?;
        for (l, row) in out.iter_mut().enumerate() {
            let pat = cache
                .get(HookPoint::Block(l, BlockHook::Pattern))
                .expect("patterns were cached")
                .narrow(2, len - 1, 1)?
                .squeeze(2)?
                .to_vec3::<f32>()?; // [b, h, k]
            for (j, &i) in members.iter().enumerate() {
                let p = gen[i].positions;
                for (h, cell) in row.iter_mut().enumerate() {
                    for (k, at) in [p.io, p.s1, p.s2].into_iter().enumerate() {
                        cell[k] += pat[j][h][at] as f64 / tokens.len() as f64;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `n` IOI pairs sharing the template of the first pair drawn.
fn one_template(
    tok: &scalpel_models::tokenizer::Tokenizer,
    seed: u64,
    n: usize,
) -> Result<Vec<IoiPair>> {
    let all = pairs::ioi_with(
        tok,
        &IoiOptions {
            n: n * 40,
            seed: seed + 7,
            corruption: Corruption::Abc,
        },
    )?;
    let t = all[0].template;
    let abba = all[0].abba;
    let chosen: Vec<IoiPair> = all
        .into_iter()
        .filter(|p| p.template == t && p.abba == abba)
        .take(n)
        .collect();
    if chosen.len() < n {
        bail!(
            "only {} prompts of one template came out; ask for fewer --position-pairs",
            chosen.len()
        );
    }
    Ok(chosen)
}

fn head_table(out: &mut String, heads: &[HeadInfo]) {
    let _ = writeln!(
        out,
        "| head | direct effect (DLA) | path patching → logits | hook_z patching | attn END→IO | END→S1 | END→S2 |\n|---|---|---|---|---|---|---|"
    );
    for h in heads {
        let _ = writeln!(
            out,
            "| {} | {:+.3} | {:.3} | {:+.3} | {:.3} | {:.3} | {:.3} |",
            h.head, h.direct_effect, h.path_to_logits, h.patch_z, h.attn_io, h.attn_s1, h.attn_s2
        );
    }
}

fn readme(s: &Summary, labels: &[String]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Indirect object identification on {}\n", s.model);
    let _ = writeln!(
        o,
        "Regenerate: `scalpel ioi --n {} --seed {} --out <this folder>` ({:.0} s on this run). \
         {} prompts from {} templates, each with its ABC corruption (all three names replaced \
         by fresh ones). Metric: logit(IO) − logit(S) at the last position.\n",
        s.pairs, s.seed, s.seconds, s.pairs, s.templates
    );
    let _ = writeln!(o, "## Task performance\n");
    let _ = writeln!(
        o,
        "| clean logit diff | ABC logit diff | IO logit > S logit | top-1 prediction is IO |\n|---|---|---|---|\n| {:.3} | {:.3} | {:.1}% | {:.1}% |\n",
        s.logit_diff_clean,
        s.logit_diff_corrupt,
        100.0 * s.accuracy_io_over_s,
        100.0 * s.top1_accuracy
    );
    let _ = writeln!(
        o,
        "## Heads that write the answer (largest direct effect)\n"
    );
    head_table(&mut o, &s.name_movers);
    let _ = writeln!(
        o,
        "\n## Heads that write against it (most negative direct effect)\n"
    );
    head_table(&mut o, &s.negative_heads);
    let _ = writeln!(
        o,
        "\nDirect effect: the head's output at the last position projected on the IO − S \
         unembedding through the final norm with its scale frozen (`scalpel dla`), mean over \
         prompts. Path patching → logits: the head's output taken from the ABC run while every \
         other head keeps its clean output (MLPs recompute); score 1 means no effect. hook_z \
         patching: the head's clean output patched into the ABC run; score 0 means no effect.\n"
    );
    let _ = writeln!(
        o,
        "## Ablation (mean over the ABC prompts, heads ablated together)\n"
    );
    let _ = writeln!(
        o,
        "| heads | logit diff | ablated | change | share lost |\n|---|---|---|---|---|"
    );
    for a in &s.ablations {
        let _ = writeln!(
            o,
            "| {}: {} | {:.3} | {:.3} | {:+.3} | {:.1}% |",
            a.what,
            a.heads.join(", "),
            a.metric_clean,
            a.metric_ablated,
            a.change,
            100.0 * a.fraction_lost
        );
    }
    let _ = writeln!(o, "\n## Residual stream by layer and position\n");
    let _ = writeln!(
        o,
        "One template ({} prompts): \"{}\". Positions: {}.\n",
        s.position_pairs,
        s.position_template,
        labels.join(" ")
    );
    match s.resid_move_layer {
        Some(l) => {
            let _ = writeln!(
                o,
                "Patching the clean residual at the last position alone restores at least half \
                 of the logit difference from layer {l} on: by then the answer has been moved to \
                 the end."
            );
        }
        None => {
            let _ = writeln!(
                o,
                "Patching the last position alone never restores half of the logit difference."
            );
        }
    }
    if let Some((l, v)) = s.s2_best {
        let _ = writeln!(
            o,
            "Patching the S2 position restores most at layer {l} (score {v:.3}).\n"
        );
    }
    let _ = writeln!(o, "## Attribution patching against exact patching\n");
    let fmt = |c: Option<f64>| c.map_or("undefined".to_string(), |c| format!("{c:.3}"));
    let _ = writeln!(
        o,
        "Pearson correlation of the normalised scores: hook_z by layer × head {}, resid_pre by \
         layer × position {}.\n",
        fmt(s.correlation_attribution_exact_z_head),
        fmt(s.correlation_attribution_exact_resid_pre)
    );
    let _ = writeln!(
        o,
        "Files: `summary.json` (everything above), `grids.json` (every cell), `dla_heads.json`, \
         heatmaps `dla_heads.svg`, `path_to_logits.svg`, `patch_z_heads.svg`, \
         `attribution_z_heads.svg`, `patch_resid_pre.svg`, `attribution_resid_pre.svg`."
    );
    o
}
