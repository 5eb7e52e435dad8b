//! Prompt-pair datasets with the default model's tokenizer (SmolLM2-135M-Instruct, fetched once
//! into the cache): JSONL files and their errors, tokenisation and its refusals, and the IOI and
//! factual generators, whose pairs the model itself must answer.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, IndexOp, Tensor};
use scalpel_circuits::pairs::{
    by_length, factual, ioi, ioi_with, read_jsonl, tokenize, write_jsonl, Corruption,
    IoiOptions, PromptPair, TokenPair,
};
use scalpel_circuits::CircuitError;
use scalpel_models::loader::{load, LoadedModel};
use scalpel_models::tokenizer::Tokenizer;

fn loaded() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| load("smollm2-135m", &Device::Cpu).unwrap())
}

fn tok() -> &'static Tokenizer {
    loaded().tokenizer().unwrap()
}

/// A fresh path in the test's scratch folder.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pairs");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", std::process::id()))
}

fn message(e: CircuitError) -> String {
    match e {
        CircuitError::Input(m) => m,
        other => panic!("expected an input error, got {other:?}"),
    }
}

fn pair(clean: &str, corrupt: &str, answer: &str, wrong: &str) -> PromptPair {
    PromptPair {
        clean: clean.into(),
        corrupt: corrupt.into(),
        answer: answer.into(),
        wrong: wrong.into(),
    }
}

/// Mean `logit(answer) − logit(wrong)` at the last position over the clean and over the
/// corrupt prompts.
fn mean_logit_diff(pairs: &[TokenPair]) -> (f64, f64) {
    let model = &loaded().model;
    let (mut clean, mut corrupt) = (0.0, 0.0);
    for (len, group) in by_length(pairs) {
        for (sum, which) in [(&mut clean, 0), (&mut corrupt, 1)] {
            let ids: Vec<u32> = group
                .iter()
                .flat_map(|&i| {
                    let p = &pairs[i];
                    if which == 0 {
                        p.clean.clone()
                    } else {
                        p.corrupt.clone()
                    }
                })
                .collect();
            let tokens = Tensor::from_vec(ids, (group.len(), len), &Device::Cpu).unwrap();
            let logits = model.forward(&tokens).unwrap();
            let last = logits.i((.., len - 1, ..)).unwrap().to_vec2::<f32>().unwrap();
            for (row, &i) in last.iter().zip(&group) {
                let p = &pairs[i];
                *sum += (row[p.answer as usize] - row[p.wrong as usize]) as f64;
            }
        }
    }
    let n = pairs.len() as f64;
    (clean / n, corrupt / n)
}

#[test]
fn explore() {
    let pairs = ioi_with(
        tok(),
        &IoiOptions {
            n: 150,
            seed: 1,
            corruption: Corruption::Abc,
        },
    )
    .unwrap();
    for t in 0..0 {
        let mine: Vec<PromptPair> = pairs
            .iter()
            .filter(|p| p.template == t)
            .map(|p| p.pair.clone())
            .collect();
        let tp = tokenize(tok(), &mine).unwrap();
        let d = mean_logit_diff(&tp);
        eprintln!("template {t}: n {} {:?} {}", mine.len(), d, mine[0].clean);
    }
    let f = factual(tok(), 200, 0).unwrap();
    let mut rels: std::collections::BTreeMap<String, Vec<PromptPair>> = Default::default();
    for p in f {
        let key = p.clean.split_whitespace().last().unwrap().to_string()
            + &p.clean[..12];
        rels.entry(key).or_default().push(p);
    }
    for (k, v) in rels {
        let tp = tokenize(tok(), &v).unwrap();
        eprintln!("{k}: n {} {:?}", v.len(), mean_logit_diff(&tp));
    }
}
