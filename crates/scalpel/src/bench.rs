//! `scalpel bench`: forward and generation throughput on a real model, beside the machine's f32
//! GEMM rate and (optionally) PyTorch `transformers` measured in the same run.
//!
//! Reported: tokens/s of a batch × seq forward with no hooks, with every residual-stream hook
//! cached, decode tokens/s with the KV cache, the peak memory of loading the model relative to
//! its f32 weight size, and, when `--torch` names a Python with torch and transformers, the same
//! forward through `transformers` and the ratio.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use scalpel_core::Hooks;
use scalpel_models::generation::{generate, GenerateOptions};
use scalpel_models::hub::ModelFiles;

/// Benchmark options.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: crate::model::ModelArgs,
    /// Sequences per forward.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Timed repetitions (the best and the median are reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Also time a forward truncated before this block (the cost `harvest` pays for hooks up to
    /// block `l - 1`).
    #[arg(long)]
    pub stop_at_layer: Option<usize>,
    /// Tokens to generate for the decode measurement.
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
    /// A Python interpreter with torch + transformers: also run the PyTorch reference
    /// (`--torch-script`) on the same GGUF, same shapes and threads, and report ratios.
    #[arg(long)]
    pub torch: Option<PathBuf>,
    /// The PyTorch side of the benchmark.
    #[arg(long, default_value = "../shared/tools/torch_forward_bench.py")]
    pub torch_script: PathBuf,
}

/// Best and median seconds of `reps` runs of `f` after one warm-up.
fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok((ts[0], ts[ts.len() / 2]))
}

/// Peak resident memory of this process so far, in bytes (Linux `VmHWM`).
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// f32 GEMM rate of this machine through candle, GFLOP/s (1024³, the same size PyTorch's side
/// measures).
fn gemm_gflops() -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let reps = 10;
    let (best, _) = time(reps, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

pub fn run(args: Args, json: bool) -> Result<()> {
    if args.batch == 0 || args.seq == 0 {
        bail!("--batch and --seq must be positive");
    }
    let rss_before = peak_rss();
    let t_load = Instant::now();
    let lm = args.model.load()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let rss_peak = peak_rss();
    let m = &lm.model;
    let cfg = m.config();
    if args.seq > cfg.n_ctx {
        bail!(
            "--seq {} is longer than the model's context of {}",
            args.seq,
            cfg.n_ctx
        );
    }
    let f32_bytes = m.n_params() as u64 * 4;

    // Token ids drawn away from the special tokens at both ends of the vocabulary.
    let n = args.batch * args.seq;
    let lo = 100u32.min(cfg.d_vocab as u32 / 4);
    let span = (cfg.d_vocab as u32 - 2 * lo).max(1);
    let ids: Vec<u32> = (0..n as u32)
        .map(|i| lo + (i.wrapping_mul(2_654_435_761) % span))
        .collect();
    let tokens = Tensor::from_vec(ids, (args.batch, args.seq), &Device::Cpu)?;

    let gemm = gemm_gflops()?;
    let fwd = time(args.reps, || {
        m.forward(&tokens)?;
        Ok(())
    })?;
    let resid = time(args.reps, || {
        let (_, cache) = m.run_with_cache(&tokens, |p| p.is_residual())?;
        std::hint::black_box(cache);
        Ok(())
    })?;
    let truncated = match args.stop_at_layer {
        Some(l) => {
            let opts = scalpel_models::transformer::RunOptions {
                stop_at_layer: Some(l),
                differentiable: false,
            };
            Some(time(args.reps, || {
                m.forward_with(&tokens, None, &mut Hooks::new(), opts)?;
                Ok(())
            })?)
        }
        None => None,
    };
    let prompt: Vec<u32> = tokens.get(0)?.narrow(0, 0, 16.min(args.seq))?.to_vec1()?;
    let gen_opts = GenerateOptions {
        max_new_tokens: args.decode,
        ..Default::default()
    };
    let dec = time(2, || {
        let g = generate(m, &prompt, &gen_opts, &mut Hooks::new(), |_| {})?;
        std::hint::black_box(g);
        Ok(())
    })?;
    // FLOPs of one forward: 2 × (matmul parameters) per token, plus attention's two matmuls.
    let matmul_params =
        (m.n_params() - cfg.d_vocab * cfg.d_model) as f64 + (cfg.d_vocab * cfg.d_model) as f64;
    let attn_flops =
        4.0 * (cfg.n_layers * cfg.n_heads * cfg.d_head) as f64 * (args.seq as f64 / 2.0);
    let flops_per_token = 2.0 * matmul_params + attn_flops;
    let tok_s = |t: f64| n as f64 / t;

    let torch = match &args.torch {
        Some(py) => Some(run_torch(py, &args, &lm.files)?),
        None => None,
    };
    let threads = std::thread::available_parallelism().map_or(1, |x| x.get());
    let ours = serde_json::json!({
        "impl": "scalpel (candle CPU, f32)",
        "model": args.model.model,
        "threads": threads,
        "batch": args.batch,
        "seq": args.seq,
        "load_seconds": round(load_s, 2),
        "load_peak_rss_mb": rss_peak.map(|b| round(b as f64 / 1e6, 1)),
        "rss_before_load_mb": rss_before.map(|b| round(b as f64 / 1e6, 1)),
        "f32_weights_mb": round(f32_bytes as f64 / 1e6, 1),
        "load_peak_over_f32_weights": rss_peak.map(|b| round(b as f64 / f32_bytes as f64, 2)),
        "forward_tok_s_best": round(tok_s(fwd.0), 1),
        "forward_tok_s_median": round(tok_s(fwd.1), 1),
        "forward_all_resid_tok_s_best": round(tok_s(resid.0), 1),
        "forward_all_resid_tok_s_median": round(tok_s(resid.1), 1),
        "all_resid_overhead": round(resid.0 / fwd.0 - 1.0, 3),
        "decode_tok_s_best": round(args.decode as f64 / dec.0, 2),
        "stop_at_layer": args.stop_at_layer,
        "truncated_forward_tok_s_best": truncated.map(|t| round(tok_s(t.0), 1)),
        "sgemm_gflops": round(gemm, 1),
        "forward_gflops": round(tok_s(fwd.0) * flops_per_token / 1e9, 1),
        "forward_fraction_of_gemm": round(tok_s(fwd.0) * flops_per_token / 1e9 / gemm, 3),
    });
    let ratios = torch.as_ref().map(|t| {
        let r = |ours_k: &str, theirs_k: &str| match (ours[ours_k].as_f64(), t[theirs_k].as_f64()) {
            (Some(a), Some(b)) if b > 0.0 => serde_json::json!(round(a / b, 3)),
            _ => serde_json::Value::Null,
        };
        serde_json::json!({
            "forward": r("forward_tok_s_best", "forward_tok_s_best"),
            "forward_all_resid": r("forward_all_resid_tok_s_best", "forward_all_resid_tok_s_best"),
            "decode": r("decode_tok_s_best", "decode_tok_s_best"),
            "sgemm": r("sgemm_gflops", "sgemm_gflops"),
        })
    });
    let report =
        serde_json::json!({ "scalpel": ours, "torch": torch, "ratio_scalpel_over_torch": ratios });
    if json {
        crate::output::print_json(&report)
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(human(&report).as_bytes())?;
        Ok(out.flush()?)
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (x * k).round() / k
}

fn run_torch(py: &PathBuf, args: &Args, files: &ModelFiles) -> Result<serde_json::Value> {
    let ModelFiles::Gguf(gguf) = files else {
        bail!("the PyTorch comparison loads a GGUF file; this model is a directory");
    };
    if !args.torch_script.exists() {
        bail!(
            "PyTorch bench script {} not found (set --torch-script)",
            args.torch_script.display()
        );
    }
    let threads = std::thread::available_parallelism().map_or(1, |x| x.get());
    tracing::info!("running the PyTorch reference with {}", py.display());
    let out = Command::new(py)
        .arg(&args.torch_script)
        .arg(gguf)
        .args(["--batch", &args.batch.to_string()])
        .args(["--seq", &args.seq.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--reps", &args.reps.to_string()])
        .args(["--decode", &args.decode.to_string()])
        .output()
        .with_context(|| format!("could not start {}", py.display()))?;
    if !out.status.success() {
        bail!(
            "PyTorch reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("PyTorch reference printed no JSON")?;
    Ok(serde_json::from_str(line)?)
}

fn human(r: &serde_json::Value) -> String {
    let s = &r["scalpel"];
    let t = &r["torch"];
    let mut o = String::new();
    let row = |o: &mut String, label: &str, k: &str| {
        let theirs = if t.is_null() {
            "-".to_string()
        } else {
            t[k].to_string()
        };
        let _ = writeln!(o, "{label:<34} {:>12} {:>12}", s[k].to_string(), theirs);
    };
    let _ = writeln!(
        o,
        "model {}  batch {} × seq {}  threads {}",
        s["model"].as_str().unwrap_or(""),
        s["batch"],
        s["seq"],
        s["threads"]
    );
    let _ = writeln!(o, "{:<34} {:>12} {:>12}", "", "scalpel", "torch");
    row(&mut o, "forward tok/s (best)", "forward_tok_s_best");
    row(&mut o, "forward tok/s (median)", "forward_tok_s_median");
    row(
        &mut o,
        "forward + all resid hooks tok/s",
        "forward_all_resid_tok_s_best",
    );
    row(&mut o, "decode tok/s", "decode_tok_s_best");
    if !s["truncated_forward_tok_s_best"].is_null() {
        let _ = writeln!(
            o,
            "forward stopped before block {}: {} tok/s",
            s["stop_at_layer"], s["truncated_forward_tok_s_best"]
        );
    }
    row(&mut o, "sgemm GFLOP/s", "sgemm_gflops");
    let _ = writeln!(
        o,
        "all-residual-hooks overhead        {}",
        s["all_resid_overhead"]
    );
    let _ = writeln!(
        o,
        "forward GFLOP/s (fraction of GEMM) {} ({})",
        s["forward_gflops"], s["forward_fraction_of_gemm"]
    );
    let _ = writeln!(
        o,
        "load: {} s, peak RSS {} MB = {}x the f32 weights ({} MB)",
        s["load_seconds"],
        s["load_peak_rss_mb"],
        s["load_peak_over_f32_weights"],
        s["f32_weights_mb"]
    );
    if !r["ratio_scalpel_over_torch"].is_null() {
        let _ = writeln!(o, "scalpel / torch: {}", r["ratio_scalpel_over_torch"]);
    }
    o
}
