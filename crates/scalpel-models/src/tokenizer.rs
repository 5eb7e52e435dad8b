//! The tokenizer: a `tokenizers::Tokenizer` plus the special tokens and chat template around it.
//!
//! Two sources:
//! - a Hugging Face directory (`tokenizer.json`, with `tokenizer_config.json`,
//!   `generation_config.json` and `chat_template.jinja` when present);
//! - a GGUF file, which carries no `tokenizer.json`, only llama.cpp's metadata (vocabulary,
//!   merges, token types, special ids). We rebuild the Hugging Face tokenizer it describes, as
//!   `transformers` does (`integrations/gguf/gguf_tokenizer_mapping.py`): "gpt2" is byte-level BPE
//!   with the pre-tokenizer `tokenizer.ggml.pre` names, "llama" is sentencepiece-style BPE with
//!   `▁` and byte fallback.
//!
//! BOS is never left to the inner post-processor: [`Tokenizer::encode`] prepends it itself when
//! the model asks for it (`add_bos`), so both sources behave the same.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::Value as Json;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};

/// A tokenizer that knows its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_ids: Vec<u32>,
    eos_token: Option<String>,
    pad_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    pieces: PieceStyle,
}

/// How a vocabulary entry spells the text it stands for; used to show one token alone.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PieceStyle {
    /// GPT-2's byte-to-character alphabet ("Ġ" is a space).
    ByteLevel,
    /// Sentencepiece: "▁" is a space, `<0x0A>` a raw byte.
    Metaspace,
    /// Anything else: ask the decoder.
    Decoder,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos_token)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .field("add_bos", &self.add_bos)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a Hugging Face model directory, with the special tokens and
    /// chat template of `tokenizer_config.json` (or `chat_template.jinja`) and the end-of-sequence
    /// ids of `generation_config.json` when those files exist.
    ///
    /// Without `add_bos_token` in the config, BOS is prepended iff `tokenizer.json`'s own
    /// post-processor adds it.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| ModelError::bad_file(&path, e.to_string()))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);

        let token = |key: &str| special_token_text(&config[key]);
        let bos_token = token("bos_token");
        let eos_token = token("eos_token");
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let pad_id = token("pad_token").and_then(|t| inner.token_to_id(&t));
        let mut eos_ids: Vec<u32> = eos_token
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        for id in json_ids(&generation["eos_token_id"]) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let add_bos = match config["add_bos_token"].as_bool() {
            Some(flag) => flag,
            None => match bos_id {
                Some(bos) => {
                    inner
                        .encode("", true)
                        .map_err(|e| ModelError::bad_file(&path, e.to_string()))?
                        .get_ids()
                        .first()
                        == Some(&bos)
                }
                None => false,
            },
        };

        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
        } else {
            config_chat_template(&config["chat_template"])
        };
        let pieces = piece_style(inner.get_decoder());
        Ok(Self {
            inner,
            bos_id,
            bos_token,
            eos_ids,
            eos_token,
            pad_id,
            add_bos,
            chat_template,
            pieces,
        })
    }

    /// Rebuilds the tokenizer a GGUF file describes from its `tokenizer.*` metadata.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let meta = Meta(&content.metadata);
        let model = meta
            .str("tokenizer.ggml.model")?
            .ok_or_else(|| gguf_error("has no `tokenizer.ggml.model`: no tokenizer to rebuild"))?;
        let tokens = meta
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| gguf_error("has no `tokenizer.ggml.tokens`"))?;
        let types = match meta.get("tokenizer.ggml.token_type") {
            Some(v) => array(v, "tokenizer.ggml.token_type")?
                .iter()
                .map(|t| integer(t).ok_or_else(|| bad_key("tokenizer.ggml.token_type", "integers")))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let token_id = |key: &str| -> Result<Option<u32>> {
            match meta.u32(key)? {
                Some(id) if id as usize >= tokens.len() => Err(gguf_error(format!(
                    "`{key}` is {id}, outside the vocabulary of {} tokens",
                    tokens.len()
                ))),
                id => Ok(id),
            }
        };
        let bos_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = token_id("tokenizer.ggml.eos_token_id")?;
        let unk_id = token_id("tokenizer.ggml.unknown_token_id")?;
        let pad_id = token_id("tokenizer.ggml.padding_token_id")?;
        let text = |id: Option<u32>| id.map(|id| tokens[id as usize].to_string());
        let merges = match meta.strings("tokenizer.ggml.merges")? {
            Some(merges) => Some(parse_merges(&merges)?),
            None => None,
        };

        let (mut inner, pieces, add_bos_default) = match model {
            "gpt2" => {
                let merges = merges.ok_or_else(|| {
                    gguf_error("is a byte-level (\"gpt2\") vocabulary without `tokenizer.ggml.merges`")
                })?;
                let pre = meta.str("tokenizer.ggml.pre")?;
                (byte_level_bpe(&tokens, &types, merges, pre)?, PieceStyle::ByteLevel, false)
            }
            "llama" => {
                let merges = match merges {
                    Some(merges) => merges,
                    None => {
                        let scores = meta.floats("tokenizer.ggml.scores")?.ok_or_else(|| {
                            gguf_error("is a \"llama\" vocabulary with neither merges nor scores")
                        })?;
                        merges_from_scores(&tokens, &scores)?
                    }
                };
                let prefix = meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let unk = text(unk_id);
                (sentencepiece_bpe(&tokens, merges, prefix, unk)?, PieceStyle::Metaspace, true)
            }
            other => {
                return Err(gguf_error(format!(
                    "`tokenizer.ggml.model` is \"{other}\", which scalpel cannot rebuild (supported: \"gpt2\", \"llama\")"
                )))
            }
        };

        // Control tokens (type 3) are special; user-defined ones (4), like `<think>`, are plain
        // added tokens. Both must match whole in the text, spelled as the file spells them.
        let mut special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3)
            .map(|(&token, _)| AddedToken::from(token, true))
            .collect();
        // transformers also makes BOS, EOS, UNK and PAD special, whatever their type.
        for id in [bos_id, eos_id, unk_id, pad_id].into_iter().flatten() {
            special.push(AddedToken::from(tokens[id as usize], true));
        }
        inner
            .add_special_tokens(special)
            .map_err(|e| ModelError::Tokenizer(format!("special tokens: {e}")))?;
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 4)
            .map(|(&token, _)| AddedToken::from(token, false).normalized(false))
            .collect();
        inner
            .add_tokens(user)
            .map_err(|e| ModelError::Tokenizer(format!("user-defined tokens: {e}")))?;

        let add_bos = meta
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(add_bos_default);
        let bos_token = text(bos_id);
        if let (true, Some(bos), Some(id)) = (add_bos, &bos_token, bos_id) {
            // So that `inner()` alone, or a saved tokenizer.json, adds BOS as Hugging Face does.
            let processor = TemplateProcessing::builder()
                .try_single(vec![bos.as_str(), "$A"])
                .and_then(|b| b.try_pair(vec![bos.as_str(), "$A", bos.as_str(), "$B:1"]))
                .map_err(ModelError::Tokenizer)?
                .special_tokens(vec![(bos.clone(), id)])
                .build()
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            inner.with_post_processor(Some(processor));
        }

        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        // End of turn / end of message: llama.cpp stops generation on these too.
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = token_id(key)? {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(Self {
            inner,
            bos_id,
            bos_token,
            eos_ids,
            eos_token: text(eos_id),
            pad_id,
            add_bos,
            chat_template: meta.str("tokenizer.chat_template")?.map(str::to_string),
            pieces,
        })
    }

    /// Token ids of `text`. Special tokens written in the text ("<|im_start|>") are matched whole;
    /// `add_special` prepends BOS iff the model wants one ([`Tokenizer::add_bos`]).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encoding {:?}: {e}", clip(text))))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, true, Some(bos)) = (add_special, self.add_bos, self.bos_id) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The text of `ids`; `skip_special` leaves out special tokens. Ids outside the vocabulary
    /// are skipped, as Hugging Face does.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(format!("decoding {} ids: {e}", ids.len())))
    }

    /// The vocabulary entry of `id`, as spelled in the vocabulary ("ĠParis", "▁Paris").
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the vocabulary entry `token`, spelled as in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text each id stands for on its own (" Paris", "\n", "<|im_end|>"), for display. A
    /// token holding part of a UTF-8 character shows as "�"; an unknown id as `<unknown id N>`.
    pub fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&id| self.token_string(id)).collect()
    }

    fn token_string(&self, id: u32) -> String {
        if let Some(added) = self.inner.get_added_vocabulary().simple_id_to_token(id) {
            return added;
        }
        let Some(token) = self.inner.id_to_token(id) else {
            return format!("<unknown id {id}>");
        };
        match self.pieces {
            PieceStyle::ByteLevel => {
                let bytes: Option<Vec<u8>> = token.chars().map(char_to_byte).collect();
                match bytes {
                    Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    None => token,
                }
            }
            PieceStyle::Metaspace => match byte_fallback(&token) {
                Some(byte) => String::from_utf8_lossy(&[byte]).into_owned(),
                None => token.replace('▁', " "),
            },
            PieceStyle::Decoder => self.inner.decode(&[id], false).unwrap_or(token),
        }
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The beginning-of-sequence token's text, if the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// Ids that end generation: EOS first, then any end-of-turn ids.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The end-of-sequence token's text, if the model has one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The padding id, if the model has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Whether `encode(text, true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The Jinja chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF rebuild

/// The split regexes of the `tokenizer.ggml.pre` flavours, as transformers maps them.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer of a byte-level vocabulary, from its `tokenizer.ggml.pre` flavour.
fn byte_level_pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    // GPT-2's regex, and no space added in front: "The" stays "The", not "ĠThe".
    let gpt2 = || ByteLevel::new(false, true, true);
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ModelError::Tokenizer(format!("split regex: {e}")))?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    match pre {
        None => {
            tracing::warn!("GGUF has no `tokenizer.ggml.pre`; using GPT-2's pre-tokenizer");
            Ok(gpt2().into())
        }
        Some("default" | "gpt-2" | "gpt2") => Ok(gpt2().into()),
        // SmolLM's tokenizer.json (and llama.cpp) isolate every digit first. transformers' GGUF
        // loader skips this; it only matters for a non-ASCII numeral after a space (" ²").
        Some("smollm") => {
            Ok(PreSequence::new(vec![Digits::new(true).into(), gpt2().into()]).into())
        }
        Some(
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "dbrx"
            | "smaug-bpe",
        ) => split(LLAMA3_SPLIT),
        Some("qwen2" | "deepseek-r1-qwen" | "megrez") => split(QWEN2_SPLIT),
        Some("tekken") => split(TEKKEN_SPLIT),
        Some("gpt-4o" | "llama4") => split(GPT4O_SPLIT),
        Some(other) => Err(gguf_error(format!(
            "`tokenizer.ggml.pre` is \"{other}\", a pre-tokenizer flavour scalpel does not know \
             (known: default, gpt-2, smollm, llama-bpe, llama3, qwen2, tekken, gpt-4o and aliases)"
        ))),
    }
}

/// Byte-level BPE ("gpt2"): every normal token is spelled in GPT-2's byte alphabet.
fn byte_level_bpe(
    tokens: &[&str],
    types: &[i64],
    merges: Vec<(String, String)>,
    pre: Option<&str>,
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, &token)| {
            // Control and user-defined tokens match raw text and keep their spelling; a normal
            // token written with characters outside the alphabet is respelled byte by byte.
            let raw = matches!(types.get(id), Some(3 | 4));
            let spelled = if raw || token.chars().all(|c| char_to_byte(c).is_some()) {
                token.to_string()
            } else {
                token.bytes().map(byte_to_char).collect()
            };
            (spelled, id as u32)
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| gguf_error(format!("byte-level BPE: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?))
        .with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// Sentencepiece-style BPE ("llama"): "▁" for spaces, `<0xAB>` tokens for bytes the vocabulary
/// lacks. `prefix` puts a "▁" in front of the text, as sentencepiece's `add_dummy_prefix`.
fn sentencepiece_bpe(
    tokens: &[&str],
    merges: Vec<(String, String)>,
    prefix: bool,
    unk: Option<String>,
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| (t.to_string(), id as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| gguf_error(format!("sentencepiece BPE: {e}")))?;
    let scheme = if prefix {
        PrependScheme::First
    } else {
        PrependScheme::Never
    };
    let replace = Replace::new("▁", " ").map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)))
        .with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// `tokenizer.ggml.merges` entries, "left right".
fn parse_merges(merges: &[&str]) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(gguf_error(format!(
                "merge {m:?} in `tokenizer.ggml.merges` is not \"left right\""
            ))),
        })
        .collect()
}

/// The merges a sentencepiece vocabulary implies (transformers' `generate_merges`): every split
/// of a token into two tokens, best score first; ties keep vocabulary order, then prefer the
/// longer left and right parts.
fn merges_from_scores(tokens: &[&str], scores: &[f32]) -> Result<Vec<(String, String)>> {
    if scores.len() != tokens.len() {
        return Err(gguf_error(format!(
            "has {} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    // Python's dict keeps the last score of a repeated token, at its first position.
    let mut order: Vec<usize> = Vec::with_capacity(tokens.len());
    let mut seen = std::collections::HashSet::new();
    for &t in tokens {
        if seen.insert(t) {
            order.push(ids[t]);
        }
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for index in order {
        let token = tokens[index];
        let mut local: Vec<(&str, &str, f32)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, scores[index]))
            .collect();
        local.sort_by_key(|&(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let key = |&(l, r, s): &(&str, &str, f32)| (s, l.chars().count(), r.chars().count());
    // Stable and descending, like Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect())
}

/// Typed reads of GGUF metadata; a key of the wrong type is an error naming it.
struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad_key(key, "a string")),
        }
    }

    fn u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match integer(v).and_then(|i| u32::try_from(i).ok()) {
                Some(i) => Ok(Some(i)),
                None => Err(bad_key(key, "a token id")),
            },
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad_key(key, "a boolean")),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        array(value, key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(bad_key(key, "an array of strings")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        array(value, key)?
            .iter()
            .map(|v| match v {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                _ => Err(bad_key(key, "an array of floats")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn array<'a>(value: &'a Value, key: &str) -> Result<&'a [Value]> {
    match value {
        Value::Array(items) => Ok(items),
        _ => Err(bad_key(key, "an array")),
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

fn gguf_error(msg: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("GGUF {msg}"))
}

fn bad_key(key: &str, expected: &str) -> ModelError {
    gguf_error(format!("metadata `{key}` is not {expected}"))
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directory

/// A JSON file that may be absent.
fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::bad_file(path, e.to_string()))
}

/// `"<s>"` or `{"content": "<s>", ...}`, as tokenizer_config.json writes special tokens.
fn special_token_text(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(map) => map
            .get("content")
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// An id or a list of ids, as generation_config.json writes `eos_token_id`.
fn json_ids(value: &Json) -> Vec<u32> {
    match value {
        Json::Array(items) => items.iter().flat_map(json_ids).collect(),
        v => v
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .into_iter()
            .collect(),
    }
}

/// A template string, or a list of named templates of which we take "default".
fn config_chat_template(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Array(items) => items
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn piece_style(decoder: Option<&DecoderWrapper>) -> PieceStyle {
    match decoder {
        Some(DecoderWrapper::ByteLevel(_)) => PieceStyle::ByteLevel,
        Some(DecoderWrapper::Metaspace(_) | DecoderWrapper::Replace(_)) => PieceStyle::Metaspace,
        Some(DecoderWrapper::Sequence(seq)) => seq
            .get_decoders()
            .iter()
            .map(|d| piece_style(Some(d)))
            .find(|&s| s != PieceStyle::Decoder)
            .unwrap_or(PieceStyle::Decoder),
        _ => PieceStyle::Decoder,
    }
}

// ---------------------------------------------------------------------------------------------
// Byte alphabets

/// Bytes GPT-2's alphabet writes as themselves.
fn printable(byte: u8) -> bool {
    matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The 68 other bytes, in order: GPT-2 writes the i-th as U+0100 + i.
fn shifted_bytes() -> &'static [u8] {
    static SHIFTED: OnceLock<Vec<u8>> = OnceLock::new();
    SHIFTED.get_or_init(|| (0..=255u8).filter(|&b| !printable(b)).collect())
}

/// GPT-2's `bytes_to_unicode`: the character a byte is spelled with in a byte-level vocabulary.
fn byte_to_char(byte: u8) -> char {
    if printable(byte) {
        return char::from(byte);
    }
    let index = shifted_bytes().iter().position(|&b| b == byte);
    let index = index.expect("a byte is printable or shifted") as u32;
    char::from_u32(256 + index).expect("U+0100..U+0143 are chars")
}

/// The inverse of [`byte_to_char`]; `None` for a character outside the alphabet.
fn char_to_byte(c: char) -> Option<u8> {
    match u32::from(c) {
        code @ 0..=255 => Some(code as u8).filter(|&b| printable(b)),
        code => shifted_bytes().get(code as usize - 256).copied(),
    }
}

/// The byte of a sentencepiece byte token, `<0x0A>`.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// The start of a long text, for error messages.
fn clip(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'A'), 'A');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(char_to_byte('▁'), None);
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(byte_fallback("<0x0A>"), Some(10));
        assert_eq!(byte_fallback("<0xFF>"), Some(255));
        assert_eq!(byte_fallback("<0x0A"), None);
        assert_eq!(byte_fallback("▁the"), None);
    }

    #[test]
    fn merges_follow_scores() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let merges = merges_from_scores(&tokens, &scores).unwrap();
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(pairs, [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]);
    }
}
