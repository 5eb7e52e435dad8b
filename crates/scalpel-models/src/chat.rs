//! Chat templates: the Jinja programs in `tokenizer_config.json` / `tokenizer.chat_template` that
//! turn a conversation into the prompt text a chat model was trained on.
//!
//! Rendered with `minijinja` set up like `transformers`' environment
//! (`utils/chat_template_utils.py`): `trim_blocks` and `lstrip_blocks`, loop controls, Python's
//! string methods (`.strip()`, `.startswith()`...), `raise_exception`, and a `tojson` that writes
//! like Python's `json.dumps` (no HTML escaping, `", "` and `": "` separators, `indent=`).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant" (templates may accept others).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders `template` for `messages`, with `add_generation_prompt` (open an assistant turn at the
/// end) and the special tokens `bos_token` / `eos_token` the template may write.
pub fn apply_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
    };
    env.render_str(template, ctx)
        .map_err(|e| ModelError::ChatTemplate(describe(&e)))
}

impl Tokenizer {
    /// Renders the model's own chat template for `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template().ok_or_else(|| {
            ModelError::ChatTemplate(
                "this model has no chat template; give the prompt as plain text".into(),
            )
        })?;
        apply_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token().unwrap_or(""),
            self.eos_token().unwrap_or(""),
        )
    }
}

/// The error's message with the template line it points at, and its cause.
fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    msg
}

/// Templates call this to refuse a conversation they cannot render.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonFormatter,
        )),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from(text))
}

/// `json.dumps`' default separators: `", "` between items, `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str) -> Result<String> {
        apply_chat_template(
            template,
            &[ChatMessage::new("user", "<b>hi</b>")],
            false,
            "<s>",
            "</s>",
        )
    }

    #[test]
    fn tojson_writes_like_python() {
        let out = render("{{ {'a': [1, 2], 'b': messages[0].content} | tojson }}").unwrap();
        assert_eq!(out, r#"{"a": [1, 2], "b": "<b>hi</b>"}"#);
        let out = render("{{ [1] | tojson(indent=2) }}").unwrap();
        assert_eq!(out, "[\n  1\n]");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let err = render(
            "{% if messages[0].role == 'user' %}{{ raise_exception('no users here') }}{% endif %}",
        )
        .unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)));
        assert!(err.to_string().contains("no users here"), "{err}");
    }

    #[test]
    fn syntax_error_is_an_error() {
        let err = render("{% for m in messages %}").unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
    }
}
