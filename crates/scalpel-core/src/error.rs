//! Errors of the hook machinery.

/// An error about hook points: an unknown name, a hook the model lacks, a replacement of the wrong
/// shape, or a failure inside a user's hook function.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The string is not a hook name, even in TransformerLens's shorthand.
    #[error("unknown hook `{name}`{}", suggest(.suggestions))]
    Unknown {
        name: String,
        suggestions: Vec<String>,
    },
    /// The hook exists in general but not in this model (layer out of range, no MLP, no rotary...).
    #[error("this model has no hook `{name}`{}", suggest(.suggestions))]
    NotInModel {
        name: String,
        suggestions: Vec<String>,
    },
    /// A hook function returned a replacement whose shape differs from the activation's.
    #[error("replacement for `{hook}` has shape {found:?}, expected {expected:?}")]
    ReplacementShape {
        hook: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A hook function failed.
    #[error("hook `{hook}` failed: {source}")]
    Failed {
        hook: String,
        #[source]
        source: candle_core::Error,
    },
}

fn suggest(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", s.join(", "))
    }
}
