//! Hook-point names: a typed enum whose string forms are TransformerLens's legacy names.
//!
//! The canonical string (`blocks.3.attn.hook_pattern`) is what is stored and printed. Parsing also
//! accepts TransformerLens's shorthand: `resid_post.6`, `resid_post6`, `k6`, `pattern3`, `attn3`,
//! `blocks.3.attn.hook_attn` and the like.

use std::fmt;
use std::str::FromStr;

use crate::HookError;

/// A hook inside block `l`. The string after `blocks.{l}.` is given by [`BlockHook::suffix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum BlockHook {
    ResidPre,
    Ln1Scale,
    Ln1Normalized,
    Q,
    K,
    V,
    RotQ,
    RotK,
    AttnScores,
    Pattern,
    Z,
    Result,
    AttnOut,
    ResidMid,
    Ln2Scale,
    Ln2Normalized,
    MlpIn,
    MlpPre,
    MlpPreLinear,
    MlpPost,
    MlpOut,
    ResidPost,
}

impl BlockHook {
    /// Every block hook in forward order.
    pub const ALL: [BlockHook; 22] = [
        BlockHook::ResidPre,
        BlockHook::Ln1Scale,
        BlockHook::Ln1Normalized,
        BlockHook::Q,
        BlockHook::K,
        BlockHook::V,
        BlockHook::RotQ,
        BlockHook::RotK,
        BlockHook::AttnScores,
        BlockHook::Pattern,
        BlockHook::Z,
        BlockHook::Result,
        BlockHook::AttnOut,
        BlockHook::ResidMid,
        BlockHook::Ln2Scale,
        BlockHook::Ln2Normalized,
        BlockHook::MlpIn,
        BlockHook::MlpPre,
        BlockHook::MlpPreLinear,
        BlockHook::MlpPost,
        BlockHook::MlpOut,
        BlockHook::ResidPost,
    ];

    /// The name after `blocks.{l}.`.
    pub fn suffix(self) -> &'static str {
        match self {
            BlockHook::ResidPre => "hook_resid_pre",
            BlockHook::Ln1Scale => "ln1.hook_scale",
            BlockHook::Ln1Normalized => "ln1.hook_normalized",
            BlockHook::Q => "attn.hook_q",
            BlockHook::K => "attn.hook_k",
            BlockHook::V => "attn.hook_v",
            BlockHook::RotQ => "attn.hook_rot_q",
            BlockHook::RotK => "attn.hook_rot_k",
            BlockHook::AttnScores => "attn.hook_attn_scores",
            BlockHook::Pattern => "attn.hook_pattern",
            BlockHook::Z => "attn.hook_z",
            BlockHook::Result => "attn.hook_result",
            BlockHook::AttnOut => "hook_attn_out",
            BlockHook::ResidMid => "hook_resid_mid",
            BlockHook::Ln2Scale => "ln2.hook_scale",
            BlockHook::Ln2Normalized => "ln2.hook_normalized",
            BlockHook::MlpIn => "hook_mlp_in",
            BlockHook::MlpPre => "mlp.hook_pre",
            BlockHook::MlpPreLinear => "mlp.hook_pre_linear",
            BlockHook::MlpPost => "mlp.hook_post",
            BlockHook::MlpOut => "hook_mlp_out",
            BlockHook::ResidPost => "hook_resid_post",
        }
    }

    /// TransformerLens's short name (`utils.get_act_name`), used by the `k6` / `resid_post.6` forms.
    fn short(self) -> &'static str {
        match self {
            BlockHook::ResidPre => "resid_pre",
            BlockHook::Ln1Scale => "ln1_scale",
            BlockHook::Ln1Normalized => "ln1_normalized",
            BlockHook::Q => "q",
            BlockHook::K => "k",
            BlockHook::V => "v",
            BlockHook::RotQ => "rot_q",
            BlockHook::RotK => "rot_k",
            BlockHook::AttnScores => "attn_scores",
            BlockHook::Pattern => "pattern",
            BlockHook::Z => "z",
            BlockHook::Result => "result",
            BlockHook::AttnOut => "attn_out",
            BlockHook::ResidMid => "resid_mid",
            BlockHook::Ln2Scale => "ln2_scale",
            BlockHook::Ln2Normalized => "ln2_normalized",
            BlockHook::MlpIn => "mlp_in",
            BlockHook::MlpPre => "pre",
            BlockHook::MlpPreLinear => "pre_linear",
            BlockHook::MlpPost => "post",
            BlockHook::MlpOut => "mlp_out",
            BlockHook::ResidPost => "resid_post",
        }
    }

    fn from_short(s: &str) -> Option<BlockHook> {
        // TransformerLens aliases: `attn` means the pattern; `scores` the scores.
        match s {
            "attn" => return Some(BlockHook::Pattern),
            "scores" => return Some(BlockHook::AttnScores),
            "mlp_post" => return Some(BlockHook::MlpPost),
            "mlp_pre" => return Some(BlockHook::MlpPre),
            _ => {}
        }
        BlockHook::ALL.into_iter().find(|h| h.short() == s)
    }

    fn from_suffix(s: &str) -> Option<BlockHook> {
        if s == "attn.hook_attn" {
            return Some(BlockHook::Pattern);
        }
        BlockHook::ALL.into_iter().find(|h| h.suffix() == s)
    }

    /// Whether this hook belongs to the attention sub-layer (including its normaliser).
    pub fn is_attention(self) -> bool {
        matches!(
            self,
            BlockHook::Ln1Scale
                | BlockHook::Ln1Normalized
                | BlockHook::Q
                | BlockHook::K
                | BlockHook::V
                | BlockHook::RotQ
                | BlockHook::RotK
                | BlockHook::AttnScores
                | BlockHook::Pattern
                | BlockHook::Z
                | BlockHook::Result
                | BlockHook::AttnOut
        )
    }

    /// Whether this hook belongs to the MLP sub-layer (including its normaliser).
    pub fn is_mlp(self) -> bool {
        matches!(
            self,
            BlockHook::Ln2Scale
                | BlockHook::Ln2Normalized
                | BlockHook::MlpIn
                | BlockHook::MlpPre
                | BlockHook::MlpPreLinear
                | BlockHook::MlpPost
                | BlockHook::MlpOut
        )
    }
}

/// A named point in the forward pass where an activation can be cached or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// `hook_embed`: token embeddings `[b, p, d]`.
    Embed,
    /// `hook_pos_embed`: learned positional embeddings `[b, p, d]`.
    PosEmbed,
    /// `blocks.{l}.…`: a hook inside block `l`.
    Block(usize, BlockHook),
    /// `ln_final.hook_scale` `[b, p, 1]`.
    LnFinalScale,
    /// `ln_final.hook_normalized` `[b, p, d]`.
    LnFinalNormalized,
    /// `unembed.hook_in` `[b, p, d]`.
    UnembedIn,
    /// `unembed.hook_out`: the logits `[b, p, v]`.
    UnembedOut,
}

impl HookPoint {
    /// Shorthand for `HookPoint::Block(layer, hook)`.
    pub fn block(layer: usize, hook: BlockHook) -> Self {
        HookPoint::Block(layer, hook)
    }

    /// `blocks.{l}.hook_resid_pre`.
    pub fn resid_pre(layer: usize) -> Self {
        HookPoint::Block(layer, BlockHook::ResidPre)
    }

    /// `blocks.{l}.hook_resid_post`.
    pub fn resid_post(layer: usize) -> Self {
        HookPoint::Block(layer, BlockHook::ResidPost)
    }

    /// The block this hook lives in, if any.
    pub fn layer(self) -> Option<usize> {
        match self {
            HookPoint::Block(l, _) => Some(l),
            _ => None,
        }
    }

    /// Whether this is a residual-stream hook (`resid_pre`, `resid_mid`, `resid_post`).
    pub fn is_residual(self) -> bool {
        matches!(
            self,
            HookPoint::Block(
                _,
                BlockHook::ResidPre | BlockHook::ResidMid | BlockHook::ResidPost
            )
        )
    }

    /// Parses a canonical name or TransformerLens shorthand, with no knowledge of a model.
    /// Unknown names get suggestions drawn from a 12-layer vocabulary.
    pub fn parse(s: &str) -> Result<HookPoint, HookError> {
        let t = s.trim();
        if let Some(h) = parse_exact(t) {
            return Ok(h);
        }
        Err(HookError::Unknown {
            name: s.to_string(),
            suggestions: nearest(t, &generic_vocabulary()),
        })
    }
}

fn parse_exact(t: &str) -> Option<HookPoint> {
    match t {
        "hook_embed" | "embed" => return Some(HookPoint::Embed),
        "hook_pos_embed" | "pos_embed" => return Some(HookPoint::PosEmbed),
        "ln_final.hook_scale" => return Some(HookPoint::LnFinalScale),
        "ln_final.hook_normalized" => return Some(HookPoint::LnFinalNormalized),
        "unembed.hook_in" => return Some(HookPoint::UnembedIn),
        "unembed.hook_out" | "logits" => return Some(HookPoint::UnembedOut),
        _ => {}
    }
    if let Some(rest) = t.strip_prefix("blocks.") {
        let (num, suffix) = rest.split_once('.')?;
        let layer = num.parse().ok()?;
        return BlockHook::from_suffix(suffix).map(|h| HookPoint::Block(layer, h));
    }
    // `resid_post.6`, `resid_post 6`, `resid_post:6`
    if let Some((name, num)) = t.rsplit_once(['.', ' ', ':', ',']) {
        if let (Some(h), Ok(layer)) = (BlockHook::from_short(name.trim()), num.trim().parse()) {
            return Some(HookPoint::Block(layer, h));
        }
    }
    // `k6`, `resid_post6`, `pattern3`
    let digits = t.len() - t.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits > 0 && digits < t.len() {
        let (name, num) = t.split_at(t.len() - digits);
        let name = name.trim_end_matches('_');
        if let (Some(h), Ok(layer)) = (BlockHook::from_short(name), num.parse()) {
            return Some(HookPoint::Block(layer, h));
        }
    }
    None
}

/// The up-to-three canonical names nearest to `name` by edit distance, measured against both the
/// canonical and the `short.layer` spelling of each candidate.
pub(crate) fn nearest(name: &str, candidates: &[HookPoint]) -> Vec<String> {
    let mut scored: Vec<(usize, String)> = candidates
        .iter()
        .map(|c| {
            let canonical = c.to_string();
            let mut d = strsim::levenshtein(name, &canonical);
            if let HookPoint::Block(l, h) = c {
                d = d.min(strsim::levenshtein(name, &format!("{}.{l}", h.short())));
                d = d.min(strsim::levenshtein(name, &format!("{}{l}", h.short())));
            }
            (d, canonical)
        })
        .collect();
    scored.sort();
    let cutoff = (name.len() / 2).max(3);
    scored
        .into_iter()
        .filter(|(d, _)| *d <= cutoff)
        .take(3)
        .map(|(_, c)| c)
        .collect()
}

fn generic_vocabulary() -> Vec<HookPoint> {
    let mut v = vec![
        HookPoint::Embed,
        HookPoint::PosEmbed,
        HookPoint::LnFinalScale,
        HookPoint::LnFinalNormalized,
        HookPoint::UnembedIn,
        HookPoint::UnembedOut,
    ];
    for l in 0..12 {
        v.extend(BlockHook::ALL.iter().map(|h| HookPoint::Block(l, *h)));
    }
    v
}

impl HookPoint {
    /// Resolves `s` against the hooks a particular model has; an unknown or absent name gets the
    /// nearest valid names of that model as suggestions.
    pub fn parse_for(s: &str, valid: &[HookPoint]) -> Result<HookPoint, HookError> {
        match parse_exact(s.trim()) {
            Some(h) if valid.contains(&h) => Ok(h),
            Some(h) => Err(HookError::NotInModel {
                name: h.to_string(),
                suggestions: nearest(&h.to_string(), valid),
            }),
            None => Err(HookError::Unknown {
                name: s.to_string(),
                suggestions: nearest(s.trim(), valid),
            }),
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => f.write_str("hook_embed"),
            HookPoint::PosEmbed => f.write_str("hook_pos_embed"),
            HookPoint::Block(l, h) => write!(f, "blocks.{l}.{}", h.suffix()),
            HookPoint::LnFinalScale => f.write_str("ln_final.hook_scale"),
            HookPoint::LnFinalNormalized => f.write_str("ln_final.hook_normalized"),
            HookPoint::UnembedIn => f.write_str("unembed.hook_in"),
            HookPoint::UnembedOut => f.write_str("unembed.hook_out"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = HookError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HookPoint::parse(s)
    }
}

impl serde::Serialize for HookPoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for HookPoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HookPoint::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_round_trip() {
        for l in [0, 7, 29] {
            for h in BlockHook::ALL {
                let hp = HookPoint::Block(l, h);
                assert_eq!(HookPoint::parse(&hp.to_string()).unwrap(), hp);
            }
        }
        for hp in [
            HookPoint::Embed,
            HookPoint::PosEmbed,
            HookPoint::LnFinalScale,
            HookPoint::LnFinalNormalized,
            HookPoint::UnembedIn,
            HookPoint::UnembedOut,
        ] {
            assert_eq!(HookPoint::parse(&hp.to_string()).unwrap(), hp);
        }
    }

    #[test]
    fn exact_strings_match_transformer_lens() {
        assert_eq!(
            HookPoint::resid_post(6).to_string(),
            "blocks.6.hook_resid_post"
        );
        assert_eq!(
            HookPoint::Block(2, BlockHook::Pattern).to_string(),
            "blocks.2.attn.hook_pattern"
        );
        assert_eq!(
            HookPoint::Block(0, BlockHook::Ln2Scale).to_string(),
            "blocks.0.ln2.hook_scale"
        );
        assert_eq!(
            HookPoint::Block(1, BlockHook::MlpPreLinear).to_string(),
            "blocks.1.mlp.hook_pre_linear"
        );
    }

    #[test]
    fn shorthand_forms() {
        let k6 = HookPoint::Block(6, BlockHook::K);
        assert_eq!(HookPoint::parse("k6").unwrap(), k6);
        assert_eq!(HookPoint::parse("k.6").unwrap(), k6);
        assert_eq!(
            HookPoint::parse("resid_post.6").unwrap(),
            HookPoint::resid_post(6)
        );
        assert_eq!(
            HookPoint::parse("resid_post6").unwrap(),
            HookPoint::resid_post(6)
        );
        assert_eq!(
            HookPoint::parse("pattern3").unwrap(),
            HookPoint::Block(3, BlockHook::Pattern)
        );
        assert_eq!(
            HookPoint::parse("attn3").unwrap(),
            HookPoint::Block(3, BlockHook::Pattern)
        );
        assert_eq!(
            HookPoint::parse("blocks.3.attn.hook_attn").unwrap(),
            HookPoint::Block(3, BlockHook::Pattern)
        );
        assert_eq!(
            HookPoint::parse("rot_q1").unwrap(),
            HookPoint::Block(1, BlockHook::RotQ)
        );
        assert_eq!(HookPoint::parse(" embed ").unwrap(), HookPoint::Embed);
    }

    #[test]
    fn unknown_names_get_suggestions() {
        let err = HookPoint::parse("blocks.6.hook_resid_pots").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("blocks.6.hook_resid_post"), "{msg}");
        assert!(HookPoint::parse("").is_err());
        assert!(HookPoint::parse("blocks.x.hook_resid_pre").is_err());
        assert!(HookPoint::parse("k").is_err());
    }

    #[test]
    fn parse_for_a_model_rejects_absent_hooks() {
        let valid = vec![HookPoint::resid_pre(0), HookPoint::resid_post(0)];
        assert!(HookPoint::parse_for("resid_post.0", &valid).is_ok());
        let err = HookPoint::parse_for("resid_post.5", &valid).unwrap_err();
        assert!(matches!(err, HookError::NotInModel { .. }));
        assert!(
            err.to_string().contains("blocks.0.hook_resid_post"),
            "{err}"
        );
    }
}
