//! Packing: the pure rules against hand-computed id lists (SAELens's meanings), then the
//! [`Packer`] through real tokenizers.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use scalpel_data::corpus::{self, Document};
use scalpel_data::packing::{
    pack, special_ids, special_positions, Packer, PackingConfig, Separator,
};
use scalpel_data::DataError;
use scalpel_models::tokenizer::Tokenizer;

const BOS: u32 = 1;
const EOS: u32 = 2;

/// Three documents: A (3 tokens), B (5), C (1).
fn abc() -> Vec<Vec<u32>> {
    vec![vec![10, 11, 12], vec![20, 21, 22, 23, 24], vec![30]]
}

fn cfg(context_size: usize, prepend_bos: bool, sep: Separator) -> PackingConfig {
    PackingConfig {
        context_size,
        prepend_bos,
        sequence_separator_token: sep,
        ..PackingConfig::default()
    }
}

fn packed(docs: Vec<Vec<u32>>, cfg: &PackingConfig) -> Vec<Vec<u32>> {
    pack(docs, Some(BOS), Some(EOS), cfg).unwrap().collect()
}

#[test]
fn bos_and_bos_separator_drop_the_separator_at_a_context_start() {
    // [BOS A] fills context 1, so the separator before B would open context 2: dropped, and
    // context 2 is [BOS B0 B1 B2]. Context 3 holds B's tail, then the separator before C; C
    // opens context 4, which stays partial and is dropped.
    let out = packed(abc(), &cfg(4, true, Separator::Bos));
    assert_eq!(
        out,
        vec![
            vec![BOS, 10, 11, 12],
            vec![BOS, 20, 21, 22],
            vec![BOS, 23, 24, BOS],
        ]
    );
}

#[test]
fn eos_separator_without_bos() {
    // Stream: 10 11 12 EOS 20 21 22 23 | 24 EOS 30 (partial, dropped).
    let out = packed(abc(), &cfg(4, false, Separator::Eos));
    assert_eq!(out, vec![vec![10, 11, 12, EOS], vec![20, 21, 22, 23]]);
}

#[test]
fn no_separator_with_bos() {
    // Each context: BOS + 2 stream tokens of 10 11 12 20 21 22 23 24 30.
    let out = packed(abc(), &cfg(3, true, Separator::None));
    assert_eq!(
        out,
        vec![
            vec![BOS, 10, 11],
            vec![BOS, 12, 20],
            vec![BOS, 21, 22],
            vec![BOS, 23, 24],
        ]
    );
}

#[test]
fn explicit_separator_id() {
    // Stream: 10 11 12 99 20 | 21 22 23 24 99 | 30 (dropped).
    let out = packed(abc(), &cfg(5, false, Separator::Id(99)));
    assert_eq!(
        out,
        vec![vec![10, 11, 12, 99, 20], vec![21, 22, 23, 24, 99]]
    );
}

#[test]
fn disable_concat_gives_one_truncated_context_per_long_enough_document() {
    let disabled = |prepend_bos| PackingConfig {
        disable_concat_sequences: true,
        ..cfg(4, prepend_bos, Separator::Eos)
    };
    let docs = || {
        let mut d = abc();
        d.push(vec![40, 41]); // too short even with BOS
        d.push(vec![BOS, 50, 51, 52, 53]); // already starts with BOS
        d
    };
    // With BOS: A (3 = n − 1 tokens) fits after BOS; B is cut; C and D are too short.
    assert_eq!(
        packed(docs(), &disabled(true)),
        vec![
            vec![BOS, 10, 11, 12],
            vec![BOS, 20, 21, 22],
            vec![BOS, 50, 51, 52]
        ]
    );
    // Without BOS: only documents of at least 4 tokens, cut to 4; no separator anywhere.
    assert_eq!(
        packed(docs(), &disabled(false)),
        vec![vec![20, 21, 22, 23], vec![BOS, 50, 51, 52]]
    );
}

#[test]
fn bos_already_in_the_stream_is_not_doubled() {
    // The first context starts on the document's own BOS; B's tail starts a context with BOS.
    let docs = vec![vec![BOS, 10, 11], vec![12]];
    assert_eq!(
        packed(docs, &cfg(3, true, Separator::None)),
        vec![vec![BOS, 10, 11]]
    );
}

#[test]
fn a_document_starting_with_the_separator_gets_no_second_one() {
    // Doc 2 brings its own EOS; doc 3 opens a fresh context, so its separator is dropped
    // even without BOS.
    let docs = vec![vec![10, 11], vec![EOS, 20], vec![30, 31, 32, 33]];
    assert_eq!(
        packed(docs, &cfg(4, false, Separator::Eos)),
        vec![vec![10, 11, EOS, 20], vec![30, 31, 32, 33]]
    );
}

#[test]
fn empty_documents_add_nothing_not_even_a_separator() {
    let docs = vec![vec![10], vec![], vec![11], vec![]];
    assert_eq!(
        packed(docs, &cfg(3, false, Separator::Eos)),
        vec![vec![10, EOS, 11]]
    );
}

#[test]
fn separator_can_close_a_context() {
    // [BOS 10 11] then the separator fills [BOS 12 BOS]; doc 2 then starts a fresh context.
    let docs = vec![vec![10, 11, 12], vec![20, 21]];
    assert_eq!(
        packed(docs, &cfg(3, true, Separator::Bos)),
        vec![vec![BOS, 10, 11], vec![BOS, 12, BOS], vec![BOS, 20, 21]]
    );
}

#[test]
fn contexts_without_bos_or_separator_are_the_stream_cut_up() {
    let docs: Vec<Vec<u32>> = (0..20u32)
        .map(|d| (0..(d * 7) % 11).map(|i| 100 * d + i).collect())
        .collect();
    let stream: Vec<u32> = docs.iter().flatten().copied().collect();
    let out = packed(docs, &cfg(6, false, Separator::None));
    assert_eq!(out.len(), stream.len() / 6);
    assert!(out.iter().all(|c| c.len() == 6));
    assert_eq!(out.concat(), stream[..out.len() * 6]);
}

#[test]
fn packing_is_lazy() {
    // An endless corpus still yields contexts.
    let docs = std::iter::repeat(vec![5u32, 6, 7]);
    let out: Vec<Vec<u32>> = pack(docs, Some(BOS), Some(EOS), &cfg(4, true, Separator::Eos))
        .unwrap()
        .take(3)
        .collect();
    assert_eq!(
        out,
        vec![vec![BOS, 5, 6, 7], vec![BOS, 5, 6, 7], vec![BOS, 5, 6, 7]]
    );
}

#[test]
fn missing_special_tokens_and_tiny_contexts_are_errors() {
    let err = |bos, eos, cfg: &PackingConfig| match pack(abc(), bos, eos, cfg) {
        Ok(_) => panic!("expected an error for {cfg:?}"),
        Err(e) => e.to_string(),
    };
    let msg = err(None, Some(EOS), &PackingConfig::default());
    assert!(
        msg.contains("prepend_bos") && msg.contains("no BOS"),
        "{msg}"
    );
    let msg = err(None, Some(EOS), &cfg(8, false, Separator::Bos));
    assert!(msg.contains("\"bos\"") && msg.contains("no BOS"), "{msg}");
    let msg = err(Some(BOS), None, &cfg(8, false, Separator::Eos));
    assert!(msg.contains("no EOS"), "{msg}");
    let msg = err(Some(BOS), Some(EOS), &cfg(1, true, Separator::None));
    assert!(msg.contains("context_size 1"), "{msg}");
    let msg = err(Some(BOS), Some(EOS), &cfg(0, false, Separator::None));
    assert!(msg.contains("context_size 0"), "{msg}");
    // Without BOS in the config, a tokenizer without BOS is fine.
    assert!(pack(abc(), None, None, &cfg(2, false, Separator::Id(7))).is_ok());
}

#[test]
fn config_defaults_and_saelens_spelling() {
    let d = PackingConfig::default();
    assert_eq!(
        (
            d.context_size,
            d.prepend_bos,
            d.sequence_separator_token,
            d.disable_concat_sequences,
            d.exclude_special_tokens
        ),
        (128, true, Separator::Bos, false, false)
    );
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["sequence_separator_token"], "bos");
    let parse = |s: &str| serde_json::from_str::<PackingConfig>(s);
    assert_eq!(parse("{}").unwrap(), d);
    for (text, sep) in [
        ("\"eos\"", Separator::Eos),
        ("\"bos\"", Separator::Bos),
        ("null", Separator::None),
        ("7", Separator::Id(7)),
    ] {
        let cfg = parse(&format!(r#"{{"sequence_separator_token": {text}}}"#)).unwrap();
        assert_eq!(cfg.sequence_separator_token, sep, "{text}");
        let back = serde_json::to_string(&cfg).unwrap();
        assert_eq!(parse(&back).unwrap(), cfg, "{back}");
    }
    let err = parse(r#"{"sequence_separator_token": "sep"}"#).unwrap_err();
    assert!(err.to_string().contains("\"sep\""), "{err}");
    assert!(parse(r#"{"context_sise": 64}"#).is_err());
}

#[test]
fn matches_saelens_on_random_cases() {
    // Made by SAELens's own `concat_and_batch_sequences` (scripts/make_corpus_fixtures.py).
    let path = fixture("corpus/packing_saelens.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let id = |key: &str| Some(golden[key].as_u64().unwrap() as u32);
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut kinds = std::collections::HashSet::new();
    for (i, case) in cases.iter().enumerate() {
        let cfg: PackingConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let docs: Vec<Vec<u32>> = serde_json::from_value(case["docs"].clone()).unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(case["contexts"].clone()).unwrap();
        let got: Vec<Vec<u32>> = pack(docs.clone(), id("bos"), id("eos"), &cfg)
            .unwrap()
            .collect();
        assert_eq!(got, want, "case {i}: {cfg:?}, docs {docs:?}");
        if !want.is_empty() {
            kinds.insert((cfg.prepend_bos, cfg.disable_concat_sequences));
        }
    }
    // Every mode gives some contexts somewhere.
    assert_eq!(kinds.len(), 4, "{kinds:?}");
}

#[test]
fn special_positions_mark_listed_ids() {
    assert_eq!(
        special_positions(&[1, 5, 2, 5, 0], &[0, 1, 2]),
        vec![true, false, true, false, true]
    );
    assert_eq!(special_positions(&[1, 2], &[]), vec![false, false]);
}

// --- Through real tokenizers ---

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The default model's tokenizer: `$SCALPEL_TEST_GGUF`, else the default model's GGUF.
fn smollm2() -> Tokenizer {
    let path = match std::env::var("SCALPEL_TEST_GGUF") {
        Ok(p) => PathBuf::from(p),
        Err(_) => match scalpel_models::hub::resolve(scalpel_models::hub::DEFAULT_MODEL) {
            Ok(scalpel_models::hub::ModelFiles::Gguf(p)) => p,
            other => panic!("the default model did not resolve to a GGUF: {other:?}"),
        },
    };
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = Content::read(&mut file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&content).unwrap()
}

#[test]
fn smollm2_packs_the_jsonl_fixture() {
    let tok = smollm2();
    assert_eq!((tok.bos_id(), tok.eos_ids().first()), (Some(1), Some(&2)));
    let cfg = cfg(8, true, Separator::Eos);
    let docs = || corpus::open(&fixture("corpus/docs.jsonl"), "text").unwrap();
    let out: Vec<Vec<u32>> = Packer::new(&tok, &cfg, docs())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    // The same as packing the documents' own ids (tokenised without BOS).
    let ids: Vec<Vec<u32>> = docs()
        .map(|d| tok.encode(&d.unwrap().text, false).unwrap())
        .collect();
    assert_eq!(ids[0][0], 504, "\"The\" should be id 504: {:?}", ids[0]);
    let expected: Vec<Vec<u32>> = pack(ids.clone(), Some(1), Some(2), &cfg).unwrap().collect();
    assert_eq!(out, expected);
    // Hand-checked shape of it: BOS then "The capital of France is Paris." (7 ids here)...
    assert_eq!(ids[0].len(), 7, "{:?}", tok.token_strings(&ids[0]));
    assert_eq!(out[0][0], 1);
    assert_eq!(out[0][1..], ids[0][..]);
    // ...whose end is a context end, so EOS is dropped and the next document opens on BOS.
    assert_eq!(out[1][..2], [1, ids[1][0]]);
    // EOS is special; so are the chat markers.
    let specials = special_ids(&tok);
    assert!(
        specials.contains(&1) && specials.contains(&2),
        "{specials:?}"
    );
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    assert!(specials.contains(&im_start), "{specials:?}");
    assert!(!specials.contains(&504));
}

/// A word-level tokenizer with no BOS: "a" → 0, "b" → 1, "c" → 2.
fn tokenizer_without_bos(dir: &Path) -> Tokenizer {
    let json = r#"{
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "c": 2, "[UNK]": 3},
                  "unk_token": "[UNK]"}
    }"#;
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    Tokenizer::from_hf_dir(dir).unwrap()
}

fn doc(text: &str) -> scalpel_data::Result<Document> {
    Ok(Document {
        text: text.into(),
        source: None,
    })
}

#[test]
fn packer_without_bos() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer_without_bos(dir.path());
    assert_eq!(tok.bos_id(), None);
    let docs = || vec![doc("a b"), doc("c c c"), doc("b")].into_iter();
    let err = Packer::new(&tok, &PackingConfig::default(), docs())
        .err()
        .expect("no BOS");
    assert!(matches!(err, DataError::Input(_)), "{err}");
    assert!(err.to_string().contains("no BOS"), "{err}");
    let out: Vec<Vec<u32>> = Packer::new(&tok, &cfg(2, false, Separator::Id(3)), docs())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    // [a b] fills a context, so "c c c" opens the next without a separator; "b" joins the
    // partial [c] after one: [0 1] [2 2] [2 3] and [1] dropped.
    assert_eq!(out, vec![vec![0, 1], vec![2, 2], vec![2, 3]]);
}

#[test]
fn packer_passes_on_a_document_error_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer_without_bos(dir.path());
    let docs = vec![
        doc("a b c"),
        Err(DataError::Input("broken corpus".into())),
        doc("a b c"),
    ];
    let mut packer = Packer::new(&tok, &cfg(3, false, Separator::None), docs.into_iter()).unwrap();
    assert_eq!(packer.next().unwrap().unwrap(), vec![0, 1, 2]);
    let err = packer.next().unwrap().unwrap_err();
    assert!(err.to_string().contains("broken corpus"), "{err}");
    assert!(packer.next().is_none());
}
