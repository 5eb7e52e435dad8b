//! Prompt-pair datasets with the default model's tokenizer (SmolLM2-135M-Instruct, fetched once
//! into the cache): JSONL files and their errors, tokenisation and its refusals, and the IOI and
//! factual generators, whose pairs the model itself must answer.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, IndexOp, Tensor};
use scalpel_circuits::pairs::{
    by_length, factual, ioi, ioi_with, read_jsonl, tokenize, write_jsonl, Corruption, IoiOptions,
    PromptPair, TokenPair,
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
    let mut sums = [0.0; 2];
    for (len, group) in by_length(pairs) {
        for (side, sum) in sums.iter_mut().enumerate() {
            let prompt = |p: &TokenPair| {
                if side == 0 {
                    p.clean.clone()
                } else {
                    p.corrupt.clone()
                }
            };
            let ids: Vec<u32> = group.iter().flat_map(|&i| prompt(&pairs[i])).collect();
            let tokens = Tensor::from_vec(ids, (group.len(), len), &Device::Cpu).unwrap();
            // [b, p, d_vocab] → [b, d_vocab] at the last position.
            let logits = model.forward(&tokens).unwrap();
            let last = logits
                .i((.., len - 1, ..))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (row, &i) in last.iter().zip(&group) {
                let p = &pairs[i];
                *sum += f64::from(row[p.answer as usize] - row[p.wrong as usize]);
            }
        }
    }
    let n = pairs.len() as f64;
    (sums[0] / n, sums[1] / n)
}

#[test]
fn jsonl_round_trips() {
    let path = scratch("round-trip.jsonl");
    let pairs = vec![
        pair("A \"quoted\"\nprompt é", "B", " x", " y"),
        pair("When Mary and John", "When Anna and Tom", " Mary", " John"),
    ];
    write_jsonl(&path, &pairs).unwrap();
    assert_eq!(read_jsonl(&path).unwrap(), pairs);
    // Blank lines are skipped.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("\n{}\n  \n", text.replace('\n', "\n\n"))).unwrap();
    assert_eq!(read_jsonl(&path).unwrap(), pairs);
    // Nothing to write is refused rather than leaving a file no reader accepts.
    assert!(message(write_jsonl(&path, &[]).unwrap_err()).contains("no pairs"));
}

#[test]
fn bad_lines_are_named() {
    let good = r#"{"clean": "a", "corrupt": "b", "answer": " c", "wrong": " d"}"#;
    let path = scratch("bad.jsonl");
    let name = path.display().to_string();
    let err = |text: &str| {
        std::fs::write(&path, text).unwrap();
        message(read_jsonl(&path).unwrap_err())
    };
    let m = err(&format!("{good}\n\n{{\"clean\": \"a\",\n"));
    assert!(m.contains(&format!("{name} line 3")), "{m}");
    assert!(m.contains("not JSON"), "{m}");
    // serde_json's own "line 1" (of the one line it saw) is not shown.
    assert!(!m.contains(" at line 1"), "{m}");
    let m = err(&format!(
        "{good}\n{}",
        good.replace("}", r#", "label": 1}"#)
    ));
    assert!(m.contains("line 2"), "{m}");
    assert!(m.contains("unknown field `label`"), "{m}");
    let m = err(r#"{"clean": "a", "corrupt": "b", "answer": " c"}"#);
    assert!(
        m.contains("line 1") && m.contains("missing field `wrong`"),
        "{m}"
    );
    let m = err(r#"{"clean": "a", "corrupt": "b", "answer": " c", "wrong": 4}"#);
    assert!(m.contains("line 1") && m.contains("invalid type"), "{m}");
    let m = err("\n \n");
    assert!(m.contains(&name) && m.contains("holds no pairs"), "{m}");
    let missing = scratch("missing.jsonl");
    let m = message(read_jsonl(&missing).unwrap_err());
    assert!(m.contains(&missing.display().to_string()), "{m}");
}

#[test]
fn multi_token_answers_are_refused_with_their_tokens() {
    let ok = pair(
        "The capital of France is",
        "The capital of Japan is",
        " Paris",
        " Tokyo",
    );
    let bad = pair(
        "When Mary and John",
        "When Anna and Tom",
        " Kristen",
        " John",
    );
    let m = message(tokenize(tok(), &[ok.clone(), bad]).unwrap_err());
    assert!(
        m.starts_with("pair 2: the answer \" Kristen\" is 2 tokens"),
        "{m}"
    );
    assert!(m.contains(r#"[" Krist", "en"]"#), "{m}");
    assert!(m.contains("leading space"), "{m}");
    let bad = pair("a", "b", " Paris", " New York");
    let m = message(tokenize(tok(), &[bad]).unwrap_err());
    assert!(m.contains("pair 1: the wrong answer \" New York\""), "{m}");
    let t = tokenize(tok(), &[ok]).unwrap();
    assert_eq!(t[0].answer, tok().encode(" Paris", false).unwrap()[0]);
    assert_eq!(
        t[0].clean,
        tok().encode("The capital of France is", true).unwrap()
    );
}

#[test]
fn unequal_lengths_name_the_first_difference() {
    let clean = "When Mary and John went to the store, John gave a drink to";
    let corrupt = "When Kristen and John went to the store, John gave a drink to";
    let good = pair(
        clean,
        clean.replace("Mary", "Anna").as_str(),
        " Mary",
        " John",
    );
    let bad = pair(clean, corrupt, " Mary", " John");
    let m = message(tokenize(tok(), &[good, bad]).unwrap_err());
    let n = tok().encode(clean, true).unwrap().len();
    let at = tok().encode("When", true).unwrap().len();
    assert!(
        m.starts_with(&format!(
            "pair 2: clean has {n} tokens, corrupt {}; they first differ at position {at} \
             (\" Mary\" vs \" Krist\")",
            n + 1
        )),
        "{m}"
    );
    // A corrupt prompt that only runs longer differs where the clean one ends.
    let p = pair(
        "The capital of France",
        "The capital of France is",
        " is",
        " was",
    );
    let m = message(tokenize(tok(), &[p]).unwrap_err());
    assert!(m.contains("(the end vs \" is\")"), "{m}");
}

#[test]
fn useless_pairs_are_refused() {
    let m = message(tokenize(tok(), &[pair("", "b", " x", " y")]).unwrap_err());
    assert_eq!(m, "pair 1: the clean prompt is empty");
    let m = message(tokenize(tok(), &[pair("a", "", " x", " y")]).unwrap_err());
    assert_eq!(m, "pair 1: the corrupt prompt is empty");
    let m = message(tokenize(tok(), &[pair("a", "b", " x", " x")]).unwrap_err());
    assert!(m.contains("same token") && m.contains("zero"), "{m}");
    let m = message(tokenize(tok(), &[pair("a", "b", "", " x")]).unwrap_err());
    assert!(m.contains("is no token"), "{m}");
    assert!(message(tokenize(tok(), &[]).unwrap_err()).contains("no pairs"));
    assert!(message(ioi(tok(), 0, 0).unwrap_err()).contains("0 IOI pairs"));
    assert!(message(factual(tok(), 0, 0).unwrap_err()).contains("0 factual pairs"));
}

#[test]
fn ioi_is_deterministic_per_seed() {
    let a = ioi(tok(), 30, 7).unwrap();
    assert_eq!(a, ioi(tok(), 30, 7).unwrap());
    assert_ne!(a, ioi(tok(), 30, 8).unwrap());
    assert_eq!(a[..10], ioi(tok(), 10, 7).unwrap()[..]);
    let f = factual(tok(), 40, 7).unwrap();
    assert_eq!(f, factual(tok(), 40, 7).unwrap());
    assert_ne!(f, factual(tok(), 40, 8).unwrap());
}

/// The name token at `at` in `ids`, as text.
fn name_at(ids: &[u32], at: usize) -> String {
    tok().token_strings(&ids[at..=at]).remove(0)
}

#[test]
fn ioi_pairs_have_their_roles_where_they_say() {
    for corruption in [Corruption::Abc, Corruption::S2] {
        let opts = IoiOptions {
            n: 300,
            seed: 3,
            corruption,
        };
        let pairs = ioi_with(tok(), &opts).unwrap();
        let plain: Vec<PromptPair> = pairs.iter().map(|p| p.pair.clone()).collect();
        let tokens = tokenize(tok(), &plain).unwrap();
        let mut templates = std::collections::BTreeSet::new();
        let mut orders = std::collections::BTreeSet::new();
        for (p, t) in pairs.iter().zip(&tokens) {
            templates.insert(p.template);
            orders.insert(p.abba);
            let pos = p.positions;
            assert_eq!(t.clean.len(), p.len);
            assert_eq!(pos.end, p.len - 1);
            assert!(p.pair.clean.ends_with(" to"), "{}", p.pair.clean);
            // The answer is the indirect object, the wrong answer the subject, named twice.
            assert_eq!(t.clean[pos.io], t.answer, "{:?}", p.pair);
            assert_eq!(t.clean[pos.s1], t.wrong, "{:?}", p.pair);
            assert_eq!(t.clean[pos.s2], t.wrong, "{:?}", p.pair);
            assert_eq!(p.abba, pos.io < pos.s1);
            assert!(pos.s1.max(pos.io) < pos.s2);
            let labels = p.labels();
            assert_eq!(
                (
                    labels[pos.io],
                    labels[pos.s1],
                    labels[pos.s2],
                    labels[pos.end]
                ),
                ("IO", "S1", "S2", "end")
            );
            let names = [pos.io, pos.s1, pos.s2];
            let clean_names: Vec<String> = names.iter().map(|&i| name_at(&t.clean, i)).collect();
            let fresh: Vec<String> = match corruption {
                Corruption::Abc => names.iter().map(|&i| name_at(&t.corrupt, i)).collect(),
                Corruption::S2 => vec![name_at(&t.corrupt, pos.s2)],
            };
            // Fresh names are distinct from each other and from the clean ones.
            let mut all = fresh.clone();
            all.extend([clean_names[0].clone(), clean_names[1].clone()]);
            all.sort();
            all.dedup();
            assert_eq!(all.len(), fresh.len() + 2, "{:?}", p.pair);
            // Nothing else changes.
            for (i, (a, b)) in t.clean.iter().zip(&t.corrupt).enumerate() {
                let changed = match corruption {
                    Corruption::Abc => names.contains(&i),
                    Corruption::S2 => i == pos.s2,
                };
                assert_eq!(a != b, changed, "position {i} of {:?}", p.pair);
            }
        }
        assert_eq!(templates.len(), 15, "every template is drawn");
        assert_eq!(orders.len(), 2, "ABBA and BABA");
    }
}

#[test]
fn factual_pairs_tokenize_and_run_out_honestly() {
    let pairs = factual(tok(), 200, 0).unwrap();
    let tokens = tokenize(tok(), &pairs).unwrap();
    for (p, t) in pairs.iter().zip(&tokens) {
        assert_ne!(p.clean, p.corrupt);
        assert_ne!(t.answer, t.wrong);
    }
    // Relations are taken in turn: the first four pairs are one of each.
    for (i, marker) in [
        "capital city of",
        "official language of",
        "located in",
        "opposite of",
    ]
    .into_iter()
    .enumerate()
    {
        let p = &pairs[i];
        assert!(
            p.clean.contains(marker) && p.corrupt.contains(marker),
            "{p:?}"
        );
    }
    let m = message(factual(tok(), 1_000_000, 0).unwrap_err());
    assert!(m.contains("distinct ones exist"), "{m}");
}

/// The model itself answers the clean prompts and not the corrupt ones: templates and facts it
/// cannot do would make useless patching datasets.
#[test]
fn the_model_solves_the_clean_prompts() {
    let ioi_pairs = tokenize(tok(), &ioi(tok(), 50, 0).unwrap()).unwrap();
    let (clean, corrupt) = mean_logit_diff(&ioi_pairs);
    eprintln!("IOI logit difference: clean {clean:.3}, corrupt {corrupt:.3}");
    assert!(clean > 2.0, "clean IOI logit difference {clean}");
    assert!(
        corrupt.abs() < 1.0,
        "ABC-corrupt IOI logit difference {corrupt}"
    );
    let f = tokenize(tok(), &factual(tok(), 50, 0).unwrap()).unwrap();
    let (clean, corrupt) = mean_logit_diff(&f);
    eprintln!("factual logit difference: clean {clean:.3}, corrupt {corrupt:.3}");
    assert!(clean > 4.0, "clean factual logit difference {clean}");
    assert!(corrupt < -4.0, "corrupt factual logit difference {corrupt}");
}
