//! Packing: tokenised documents into fixed-size contexts, with the meanings SAELens gives its
//! options (`ActivationsStore` and `concat_and_batch_sequences` in
//! `sae_lens/tokenization_and_batching.py`), so a dictionary trained here reads the same token
//! stream as one trained there with the same `context_size`, `prepend_bos`,
//! `sequence_separator_token` and `disable_concat_sequences`.
//!
//! The rules, for a stream of documents tokenised without special tokens:
//! - **Concatenation** (the default): documents are joined into one stream, the separator token
//!   between consecutive documents, and the stream is cut into contexts of `context_size`.
//!   With `prepend_bos`, each context is BOS followed by `context_size − 1` stream tokens.
//!   A context that starts at a document boundary gets no separator (SAELens adds the separator
//!   only to a context already holding tokens), so BOS is never followed by a separator. A
//!   separator is not added before a document that already starts with it, nor BOS before a
//!   context whose first token is already BOS. Empty documents contribute nothing, not even a
//!   separator. The final partial context is dropped.
//! - **`disable_concat_sequences`**: each document alone gives at most one context, its first
//!   tokens (BOS first when `prepend_bos`, unless it already starts with BOS); the rest of a
//!   long document is dropped, and a document too short to fill a context gives none. The
//!   separator is unused.
//! - **`exclude_special_tokens`** does not change packing: the activation store skips the
//!   positions [`special_positions`] marks.

use std::collections::VecDeque;
use std::convert::Infallible;

use scalpel_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::corpus::Document;
use crate::error::{DataError, Result};

/// The token put between two documents of the stream. Written in configs as SAELens writes
/// `sequence_separator_token`: `"bos"`, `"eos"`, `null` or a token id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Option<SeparatorRepr>", into = "Option<SeparatorRepr>")]
pub enum Separator {
    Bos,
    /// The tokenizer's first end-of-sequence id.
    Eos,
    /// Documents are joined with nothing between them.
    None,
    Id(u32),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SeparatorRepr {
    Id(u32),
    Name(String),
}

impl TryFrom<Option<SeparatorRepr>> for Separator {
    type Error = String;

    fn try_from(repr: Option<SeparatorRepr>) -> Result<Self, String> {
        match repr {
            None => Ok(Separator::None),
            Some(SeparatorRepr::Id(id)) => Ok(Separator::Id(id)),
            Some(SeparatorRepr::Name(name)) => match name.as_str() {
                "bos" => Ok(Separator::Bos),
                "eos" => Ok(Separator::Eos),
                _ => Err(format!(
                    "sequence_separator_token {name:?}: expected \"bos\", \"eos\", null or a \
                     token id"
                )),
            },
        }
    }
}

impl From<Separator> for Option<SeparatorRepr> {
    fn from(sep: Separator) -> Self {
        match sep {
            Separator::Bos => Some(SeparatorRepr::Name("bos".into())),
            Separator::Eos => Some(SeparatorRepr::Name("eos".into())),
            Separator::None => None,
            Separator::Id(id) => Some(SeparatorRepr::Id(id)),
        }
    }
}

/// How documents become contexts; the field names and defaults are SAELens's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PackingConfig {
    /// Tokens per context.
    pub context_size: usize,
    /// Start every context with BOS.
    pub prepend_bos: bool,
    /// The token between concatenated documents.
    pub sequence_separator_token: Separator,
    /// One context per document, never mixing documents (see the module docs).
    pub disable_concat_sequences: bool,
    /// Skip positions holding special tokens when collecting activations.
    pub exclude_special_tokens: bool,
}

impl Default for PackingConfig {
    fn default() -> Self {
        Self {
            context_size: 128,
            prepend_bos: true,
            sequence_separator_token: Separator::Bos,
            disable_concat_sequences: false,
            exclude_special_tokens: false,
        }
    }
}

/// Packs token-id documents into contexts (see the module docs), lazily: one document is
/// consumed at a time. `bos` and `eos` are the tokenizer's; an error when the config names one
/// that is missing, or when `context_size` is too small.
pub fn pack(
    docs: impl IntoIterator<Item = Vec<u32>>,
    bos: Option<u32>,
    eos: Option<u32>,
    cfg: &PackingConfig,
) -> Result<impl Iterator<Item = Vec<u32>>> {
    let state = PackState::new(cfg, bos, eos)?;
    let docs = docs.into_iter().map(Ok::<_, Infallible>);
    Ok(Pack::new(docs, state).map(|ctx| match ctx {
        Ok(ctx) => ctx,
        Err(never) => match never {},
    }))
}

/// Tokenises documents and packs them into contexts, lazily: yields `[context_size]` token ids
/// at a time, holding one document's tokens. Errors from the documents or the tokenizer are
/// yielded in place and end the stream.
pub struct Packer<'t> {
    inner: Pack<Box<dyn Iterator<Item = Result<Vec<u32>>> + Send + 't>>,
}

impl<'t> Packer<'t> {
    /// Documents are tokenised without special tokens (SAELens's `prepend_bos=False`); BOS and
    /// separators come from `cfg` alone. An error when `cfg` asks for a BOS or EOS the
    /// tokenizer lacks.
    pub fn new(
        tokenizer: &'t Tokenizer,
        cfg: &PackingConfig,
        docs: impl Iterator<Item = Result<Document>> + Send + 't,
    ) -> Result<Self> {
        let state = PackState::new(
            cfg,
            tokenizer.bos_id(),
            tokenizer.eos_ids().first().copied(),
        )?;
        let tokens = docs.map(move |doc| Ok(tokenizer.encode(&doc?.text, false)?));
        Ok(Self {
            inner: Pack::new(Box::new(tokens), state),
        })
    }
}

impl Iterator for Packer<'_> {
    type Item = Result<Vec<u32>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next()
    }
}

/// For each position of `ctx`, whether its token is one of `specials` (SAELens's
/// `exclude_special_tokens` drops those positions' activations).
pub fn special_positions(ctx: &[u32], specials: &[u32]) -> Vec<bool> {
    ctx.iter().map(|t| specials.contains(t)).collect()
}

/// The ids SAELens's `exclude_special_tokens = true` excludes: BOS, EOS, PAD and every special
/// token of the vocabulary (`<|im_start|>`...), sorted.
pub fn special_ids(tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer
        .inner()
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, token)| token.special)
        .map(|(id, _)| id)
        .chain(tokenizer.bos_id())
        .chain(tokenizer.eos_ids().iter().copied())
        .chain(tokenizer.pad_id())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The packing rules over token ids, with the config's special tokens resolved.
struct PackState {
    context_size: usize,
    /// BOS when `prepend_bos`.
    begin: Option<u32>,
    separator: Option<u32>,
    concat: bool,
    /// The context being filled; empty between contexts.
    buf: Vec<u32>,
}

impl PackState {
    fn new(cfg: &PackingConfig, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        let need = |id: Option<u32>, token: &str, what: &str| {
            id.ok_or_else(|| {
                DataError::Input(format!("{what}, but the tokenizer has no {token} token"))
            })
        };
        let begin = if cfg.prepend_bos {
            Some(need(
                bos,
                "BOS",
                "prepend_bos = true (set it to false for a model without BOS)",
            )?)
        } else {
            None
        };
        let separator = if cfg.disable_concat_sequences {
            None
        } else {
            match cfg.sequence_separator_token {
                Separator::Bos => Some(need(bos, "BOS", "sequence_separator_token = \"bos\"")?),
                Separator::Eos => Some(need(eos, "EOS", "sequence_separator_token = \"eos\"")?),
                Separator::None => None,
                Separator::Id(id) => Some(id),
            }
        };
        let min = if begin.is_some() { 2 } else { 1 };
        if cfg.context_size < min {
            return Err(DataError::Input(format!(
                "context_size {} is too small: at least {min}{}",
                cfg.context_size,
                if begin.is_some() {
                    " with prepend_bos"
                } else {
                    ""
                }
            )));
        }
        Ok(Self {
            context_size: cfg.context_size,
            begin,
            separator,
            concat: !cfg.disable_concat_sequences,
            buf: Vec::with_capacity(cfg.context_size),
        })
    }

    /// Adds one document, pushing every context it completes onto `out`.
    fn feed(&mut self, doc: &[u32], out: &mut VecDeque<Vec<u32>>) {
        let n = self.context_size;
        let Some(&first) = doc.first() else {
            return;
        };
        if !self.concat {
            // SAELens (disable_concat_sequences): BOS + the first n − 1 tokens when the
            // document has at least n − 1 and does not start with BOS; else its first n tokens
            // when it has n; else nothing.
            match self.begin {
                Some(b) if first != b && doc.len() + 1 >= n => {
                    let mut ctx = Vec::with_capacity(n);
                    ctx.push(b);
                    ctx.extend_from_slice(&doc[..n - 1]);
                    out.push_back(ctx);
                }
                _ if doc.len() >= n => out.push_back(doc[..n].to_vec()),
                _ => {}
            }
            return;
        }
        let mut offset = 0;
        if !self.buf.is_empty() {
            // Joining a context already holding tokens: the separator goes first. There is
            // always room for it, since a full context has already been handed out.
            if let Some(s) = self.separator.filter(|&s| s != first) {
                self.buf.push(s);
            }
        }
        loop {
            if self.buf.is_empty() {
                // A fresh context: BOS, unless the stream already has BOS here. No separator
                // (SAELens adds it only to a context already holding tokens).
                if let Some(b) = self.begin.filter(|&b| b != doc[offset]) {
                    self.buf.push(b);
                }
            }
            let take = (n - self.buf.len()).min(doc.len() - offset);
            self.buf.extend_from_slice(&doc[offset..offset + take]);
            offset += take;
            if self.buf.len() == n {
                out.push_back(std::mem::replace(&mut self.buf, Vec::with_capacity(n)));
            }
            if offset == doc.len() {
                return;
            }
        }
    }
}

/// Contexts from a stream of token-id documents; ends at the first error it passes on.
struct Pack<I> {
    docs: I,
    state: PackState,
    ready: VecDeque<Vec<u32>>,
    done: bool,
}

impl<I> Pack<I> {
    fn new(docs: I, state: PackState) -> Self {
        Self {
            docs,
            state,
            ready: VecDeque::new(),
            done: false,
        }
    }
}

impl<I: Iterator<Item = Result<Vec<u32>, E>>, E> Iterator for Pack<I> {
    type Item = Result<Vec<u32>, E>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(ctx) = self.ready.pop_front() {
                return Some(Ok(ctx));
            }
            if self.done {
                return None;
            }
            match self.docs.next() {
                // The last, partial context is dropped, as SAELens does.
                None => self.done = true,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(doc)) => self.state.feed(&doc, &mut self.ready),
            }
        }
    }
}
