//! What attribution patching costs, in forward-equivalents, on the default model.
//!
//! `cargo run --release -p scalpel-circuits --example attribution_cost -- [PAIRS.jsonl] [--json]
//! [--compare]`
//!
//! Pairs come from the file (all of one token length), or are 20 generated IOI pairs of 16
//! tokens. Each of 3 repetitions times one plain forward pass over the clean prompts (full
//! logits: the unit of cost) and right after it the lean `attribute` pass over the `z_head_pos`
//! sweep; the reported figure is the median of the 3 ratios, so that load from other processes
//! hits both sides of each ratio alike. `--compare` also times the shared-setup path
//! (`Patcher::new` + `Patcher::attribution`) and checks the two agree.

use std::time::Instant;

use candle_core::{Device, Tensor};
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs;
use scalpel_circuits::patching::{attribute, Direction, Patcher, Sweep};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let compare = args.iter().any(|a| a == "--compare");
    let file = args.iter().find(|a| !a.starts_with("--"));
    let loaded = scalpel_models::loader::load("smollm2-135m", &Device::Cpu)?;
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    let tokens = match file {
        Some(f) => pairs::tokenize(tok, &pairs::read_jsonl(std::path::Path::new(f))?)?,
        None => {
            let all = pairs::tokenize(tok, &pairs::ioi(tok, 400, 0)?)?;
            all.into_iter()
                .filter(|p| p.clean.len() == 16)
                .take(20)
                .collect()
        }
    };
    let seq = tokens[0].clean.len();
    anyhow::ensure!(
        tokens.iter().all(|p| p.clean.len() == seq),
        "pairs of several lengths"
    );
    let metric = Metric::parse("logit_diff", Some(tok))?;
    let flat: Vec<u32> = tokens.iter().flat_map(|p| p.clean.clone()).collect();
    let batch = Tensor::from_vec(flat, (tokens.len(), seq), &Device::Cpu)?;
    let sweep = [Sweep::ZHeadPos];
    attribute(model, &tokens, &metric, &sweep, Direction::Denoise)?; // warm-up
    let (mut fwd, mut lean, mut ratio, mut shared) = (vec![], vec![], vec![], vec![]);
    let mut grid = None;
    for _ in 0..3 {
        let t = Instant::now();
        model.forward(&batch)?;
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let out = attribute(model, &tokens, &metric, &sweep, Direction::Denoise)?;
        let a = t.elapsed().as_secs_f64();
        fwd.push(f);
        lean.push(a);
        ratio.push(a / f);
        if compare {
            let t = Instant::now();
            let p = Patcher::new(model, &tokens, &metric)?;
            let g = p.attribution(&sweep, Direction::Denoise)?;
            shared.push(t.elapsed().as_secs_f64() / f);
            let d = g[0]
                .values
                .iter()
                .zip(&out.grids[0].values)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            anyhow::ensure!(d < 1e-4, "the two attribution paths differ by {d}");
        }
        grid = Some(out);
    }
    let out = grid.expect("three repetitions ran");
    let report = serde_json::json!({
        "pairs": tokens.len(),
        "tokens_per_prompt": seq,
        "forward_seconds": fwd,
        "attribution_seconds": lean,
        "forward_equivalents": ratio,
        "forward_equivalents_median": median(ratio.clone()),
        "shared_setup_forward_equivalents": shared,
        "clean": out.clean,
        "corrupt": out.corrupt,
        "shape": out.grids[0].shape,
        // the estimate itself (attributed change of the metric), as the reference stores it
        "values": out.grids[0].values.iter().map(|v| v - out.corrupt).collect::<Vec<_>>(),
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "{} pairs x {seq} tokens: attribution of z_head_pos = {:.2} forward-equivalents \
             (median of {:?}); forward {:?} s, attribution {:?} s{}",
            tokens.len(),
            median(ratio.clone()),
            ratio,
            fwd,
            lean,
            if compare {
                format!("; shared-setup path {shared:.2?}")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
