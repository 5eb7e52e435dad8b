//! What attribution patching costs, in forward-equivalents: 20 IOI pairs of 16 tokens on the
//! default model, the shared-setup path (`Patcher::new` + `attribution`) beside the lean
//! `attribute`, in wall-clock and CPU seconds. `cargo run --release -p scalpel-circuits --example
//! attribution_cost`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs;
use scalpel_circuits::patching::{attribute, Direction, Patcher, Sweep};

/// CPU seconds of this process (user + system).
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (t, c) = (Instant::now(), cpu());
    let r = f();
    (r, t.elapsed().as_secs_f64(), cpu() - c)
}

fn main() -> anyhow::Result<()> {
    let loaded = scalpel_models::loader::load("smollm2-135m", &Device::Cpu)?;
    let model = &loaded.model;
    let tok = loaded.tokenizer()?;
    let text = pairs::ioi(tok, 400, 0)?;
    let all = pairs::tokenize(tok, &text)?;
    let tokens: Vec<_> = all
        .into_iter()
        .filter(|p| p.clean.len() == 16)
        .take(20)
        .collect();
    assert_eq!(tokens.len(), 20);
    let metric = Metric::parse("logit_diff", Some(tok))?;
    let seq = tokens[0].clean.len();
    let flat: Vec<u32> = tokens.iter().flat_map(|p| p.clean.clone()).collect();
    let batch = Tensor::from_vec(flat, (tokens.len(), seq), &Device::Cpu)?;
    for rep in 0..3 {
        let (_, fw, fc) = time(|| model.forward(&batch).unwrap());
        let (p, sw, sc) = time(|| Patcher::new(model, &tokens, &metric).unwrap());
        let (old, aw, ac) = time(|| {
            p.attribution(&[Sweep::ZHeadPos], Direction::Denoise)
                .unwrap()
        });
        let (new, nw, nc) = time(|| {
            attribute(
                model,
                &tokens,
                &metric,
                &[Sweep::ZHeadPos],
                Direction::Denoise,
            )
            .unwrap()
        });
        let maxd = old[0]
            .values
            .iter()
            .zip(&new.grids[0].values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!(
            "rep {rep}: fwd {fw:.3}s/{fc:.3}cpu | old setup+attr {:.3}s/{:.3}cpu fe {:.2}/{:.2}cpu | new {nw:.3}s/{nc:.3}cpu fe {:.2}/{:.2}cpu | maxdiff {maxd:.2e} clean {:.4}/{:.4}",
            sw + aw, sc + ac, (sw + aw) / fw, (sc + ac) / fc, nw / fw, nc / fc, p.clean_metric(), new.clean
        );
    }
    Ok(())
}
