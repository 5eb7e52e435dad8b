//! Turning `--prompt` (and `--chat`, `--system`) into token ids, the same way for every
//! subcommand.

use anyhow::{bail, Result};
use scalpel_models::chat::ChatMessage;
use scalpel_models::tokenizer::Tokenizer;

/// The token ids of `prompt`: plain text (with BOS only when the tokenizer adds one), or, with
/// `chat`, one user turn (after an optional system turn) through the model's chat template,
/// ending with the prompt that opens the assistant's turn.
pub fn encode(tok: &Tokenizer, prompt: &str, chat: bool, system: Option<&str>) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("empty prompt: --prompt needs some text");
    }
    let ids = if chat {
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", prompt));
        let text = tok.apply_chat_template(&messages, true)?;
        // The template writes any special tokens (BOS included) itself.
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    };
    if ids.is_empty() {
        bail!("the prompt {prompt:?} encodes to no tokens");
    }
    Ok(ids)
}

/// The one token `text` encodes to (no special tokens), or an error naming its tokens: answers
/// and targets are compared one token at a time.
pub fn single_token(tok: &Tokenizer, text: &str) -> Result<u32> {
    let ids = tok.encode(text, false)?;
    match ids.as_slice() {
        [id] => Ok(*id),
        [] => bail!("{text:?} encodes to no tokens; one is needed"),
        _ => bail!(
            "{text:?} is {} tokens ({:?}); one is needed (a leading space often matters)",
            ids.len(),
            tok.token_strings(&ids)
        ),
    }
}
