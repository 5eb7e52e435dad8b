//! Datasets of clean/corrupt prompt pairs for activation patching: a clean prompt the model
//! answers, a corrupt one that differs only in the tokens that matter, and the two answers whose
//! logit difference is measured at the last position.
//!
//! - JSONL files, one [`PromptPair`] per line ([`read_jsonl`], [`write_jsonl`]), and
//!   [`tokenize`], which refuses anything patching cannot use: answers that are not one token,
//!   clean and corrupt prompts of different token lengths.
//! - [`ioi`]: Indirect Object Identification (Wang et al. 2022, "Interpretability in the Wild",
//!   <https://arxiv.org/abs/2211.00593>): "When Mary and John went to the store, John gave a drink
//!   to" → " Mary", with the paper's ABC corruption (three fresh names).
//! - [`factual`]: factual recall ("The capital city of France is" → " Paris" against the same
//!   prompt about Japan → " Tokyo"), as in Meng et al. 2022 (ROME,
//!   <https://arxiv.org/abs/2202.05262>): capitals, official languages, landmarks' cities and
//!   opposites, facts SmolLM2-135M knows.
//!
//! Generated prompts use only names, places, objects and attributes that are one token (with a
//! leading space) in the tokenizer at hand, so every pair of one template has one token length.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use scalpel_models::tokenizer::Tokenizer;

use crate::{CircuitError, Result};

/// One line of a pairs JSONL file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptPair {
    pub clean: String,
    pub corrupt: String,
    /// The clean prompt's answer (one token, usually with a leading space: " Mary").
    pub answer: String,
    /// The answer the corruption pushes towards; the metric is `logit(answer) − logit(wrong)`.
    pub wrong: String,
}

/// A pair as token ids; `clean.len() == corrupt.len()` always holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPair {
    pub clean: Vec<u32>,
    pub corrupt: Vec<u32>,
    pub answer: u32,
    pub wrong: u32,
}

/// What one line of a pairs file looks like, for error messages.
const LINE_SHAPE: &str =
    r#"each line is {"clean": "...", "corrupt": "...", "answer": " ...", "wrong": " ..."}"#;

/// Reads a JSONL file of pairs, one JSON object per line; blank lines are skipped. Errors name
/// the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<PromptPair>> {
    read_lines(path, LINE_SHAPE, "pairs")
}

/// Reads a JSONL file of `T`, one object per line, blank lines skipped. A line that does not
/// parse is named with its file, line and column, followed by `shape` (what a line should look
/// like); a file with no objects is an error naming `what` it should hold.
pub fn read_lines<T: serde::de::DeserializeOwned>(
    path: &Path,
    shape: &str,
    what: &str,
) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CircuitError::Input(format!("reading {}: {e}", path.display())))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item = serde_json::from_str(line).map_err(|e| {
            // serde_json counts lines inside the one line it saw; keep the column only.
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg);
            let problem = match e.classify() {
                serde_json::error::Category::Data => msg.to_string(),
                _ => format!("not JSON ({msg})"),
            };
            CircuitError::Input(format!(
                "{} line {}, column {}: {problem}; {shape}",
                path.display(),
                i + 1,
                e.column()
            ))
        })?;
        items.push(item);
    }
    if items.is_empty() {
        return Err(CircuitError::Input(format!(
            "{} holds no {what}; {shape}",
            path.display()
        )));
    }
    Ok(items)
}

/// Writes `pairs` as JSONL to `w`, one object per line.
pub fn write_jsonl_to(w: &mut dyn Write, pairs: &[PromptPair]) -> io::Result<()> {
    for pair in pairs {
        serde_json::to_writer(&mut *w, pair)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// Writes `pairs` to `path` as JSONL, atomically (a reader never sees half a file).
pub fn write_jsonl(path: &Path, pairs: &[PromptPair]) -> Result<()> {
    if pairs.is_empty() {
        return Err(CircuitError::Input(format!(
            "no pairs to write to {}",
            path.display()
        )));
    }
    scalpel_models::files::write_atomically(path, |w| write_jsonl_to(w, pairs))
        .map_err(|(p, e)| CircuitError::Input(format!("writing {}: {e}", p.display())))
}

/// Token ids of every pair: prompts with BOS when the tokenizer adds one, answers as one token
/// each. Refuses, naming the pair (1-based), empty prompts, answers that are not exactly one
/// token, answer and wrong that are the same token, and clean and corrupt prompts of different
/// token lengths (patching swaps activations position by position).
pub fn tokenize(tok: &Tokenizer, pairs: &[PromptPair]) -> Result<Vec<TokenPair>> {
    if pairs.is_empty() {
        return Err(CircuitError::Input("no pairs to tokenize".into()));
    }
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| tokenize_pair(tok, i + 1, p))
        .collect()
}

fn tokenize_pair(tok: &Tokenizer, n: usize, p: &PromptPair) -> Result<TokenPair> {
    let bad = |msg: String| CircuitError::Input(format!("pair {n}: {msg}"));
    for (name, text) in [("clean", &p.clean), ("corrupt", &p.corrupt)] {
        if text.is_empty() {
            return Err(bad(format!("the {name} prompt is empty")));
        }
    }
    let answer = one_token(tok, "answer", &p.answer).map_err(bad)?;
    let wrong = one_token(tok, "wrong answer", &p.wrong).map_err(bad)?;
    if answer == wrong {
        return Err(bad(format!(
            "answer {:?} and wrong {:?} are the same token, so their logit difference is \
             always zero",
            p.answer, p.wrong
        )));
    }
    let clean = tok.encode(&p.clean, true)?;
    let corrupt = tok.encode(&p.corrupt, true)?;
    if clean.len() != corrupt.len() {
        let at = clean
            .iter()
            .zip(&corrupt)
            .position(|(a, b)| a != b)
            .unwrap_or(clean.len().min(corrupt.len()));
        let shown = |ids: &[u32]| match ids.get(at) {
            Some(&id) => format!("{:?}", tok.token_strings(&[id])[0]),
            None => "the end".to_string(),
        };
        return Err(bad(format!(
            "clean has {} tokens, corrupt {}; they first differ at position {at} ({} vs {}). \
             Patching needs prompts of equal token length",
            clean.len(),
            corrupt.len(),
            shown(&clean),
            shown(&corrupt)
        )));
    }
    Ok(TokenPair {
        clean,
        corrupt,
        answer,
        wrong,
    })
}

/// The one token `text` encodes to, without special tokens, or a message naming its tokens.
fn one_token(tok: &Tokenizer, what: &str, text: &str) -> std::result::Result<u32, String> {
    let ids = tok.encode(text, false).map_err(|e| e.to_string())?;
    match ids.as_slice() {
        [id] => Ok(*id),
        [] => Err(format!("the {what} {text:?} is no token; it must be one")),
        _ => Err(format!(
            "the {what} {text:?} is {} tokens {:?}; it must be one (a leading space often \
             matters: \" Paris\" and \"Paris\" are different tokens)",
            ids.len(),
            tok.token_strings(&ids)
        )),
    }
}

/// Indices of `pairs` grouped by token length, shortest first: each group stacks into one batch.
pub fn by_length(pairs: &[TokenPair]) -> Vec<(usize, Vec<usize>)> {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in pairs.iter().enumerate() {
        groups.entry(p.clean.len()).or_default().push(i);
    }
    groups.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Indirect Object Identification

/// IOI templates: `{A} and {B}` introduce two people, then `{S}` (the subject, the second
/// mention S2) gives something to the other, the indirect object, whose name is the answer.
/// Every name slot follows a space, so a name is the one token " Mary"; `{PLACE}` and
/// `{OBJECT}` likewise.
const IOI_TEMPLATES: [&str; 15] = [
    "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "After {A} and {B} arrived at the {PLACE}, {S} handed a {OBJECT} to",
    "Then, {A} and {B} had a long day at the {PLACE}. {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} passed a {OBJECT} to",
    "Yesterday {A} and {B} walked to the {PLACE}, and {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "At the {PLACE}, {A} and {B} found a {OBJECT}. {S} gave it to",
    "After a meeting at the {PLACE}, {A} and {B} stayed late. {S} sent a {OBJECT} to",
    "The {PLACE} was busy when {A} and {B} arrived, so {S} brought a {OBJECT} to",
    "Since {A} and {B} were at the {PLACE} together, {S} offered a {OBJECT} to",
    "On Monday, {A} and {B} cleaned the {PLACE}. Afterwards, {S} gave a {OBJECT} to",
    "At the {PLACE}, {A} and {B} were talking, and {S} showed a {OBJECT} to",
    "When {A} and {B} visited the {PLACE}, {S} threw a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {S} handed the {OBJECT} over to",
    "Later, {A} and {B} sat down at the {PLACE}, where {S} sold a {OBJECT} to",
];

/// Common English first names; only those one token with a leading space are used.
const NAMES: &str = "\
    Aaron Adam Alan Albert Alex Alice Amanda Amy Andrew Angela Anna Anne Anthony Arthur Barbara \
    Ben Betty Bill Bob Brian Carl Carol Charles Charlie Chris Daniel David Diana Donald Edward \
    Elizabeth Emily Emma Eric Frank Fred Gary George Grace Hannah Harry Helen Henry Jack Jacob \
    James Jane Jason Jeff Jennifer Jessica Jim Joe John Joseph Julia Justin Karen Kate Kelly \
    Kevin Kristen Laura Linda Lisa Lucy Mark Martin Mary Matt Michael Mike Nancy Nick Oliver \
    Patrick Paul Peter Rachel Richard Robert Roger Rose Ruth Ryan Sam Sarah Scott Simon Sophie \
    Steve Susan Thomas Tim Tom Tony Victoria William Amber Leo";

/// Places, used after "the".
const PLACES: &str = "\
    store garden restaurant school hospital park office station house market beach library \
    kitchen church bank museum party zoo shop farm hotel theater cafe gym";

/// Things handed over, used after "a", so none starts with a vowel.
const OBJECTS: &str = "\
    drink book ring bone basketball computer necklace flower snack bag key letter gift ball pen \
    cake hat phone ticket card map cup box bottle";

/// How the corrupt prompt of an IOI pair is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Corruption {
    /// The paper's p_ABC: the same sentence with all three names (IO, S1, S2) replaced by three
    /// fresh, distinct names; no name in the corrupt prompt points to the answer.
    #[default]
    Abc,
    /// Only the second mention of the subject replaced by a fresh name: the sentence no longer
    /// says who is repeated, which removes the signal the name movers rely on.
    S2,
}

impl std::str::FromStr for Corruption {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "abc" => Ok(Self::Abc),
            "s2" => Ok(Self::S2),
            _ => Err(format!("unknown IOI corruption {s:?}: `abc` or `s2`")),
        }
    }
}

/// What [`ioi_with`] generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoiOptions {
    pub n: usize,
    pub seed: u64,
    pub corruption: Corruption,
}

impl Default for IoiOptions {
    fn default() -> Self {
        Self {
            n: 100,
            seed: 0,
            corruption: Corruption::Abc,
        }
    }
}

/// Token positions of an IOI prompt's roles (BOS counted when the tokenizer adds one); the same
/// in the clean and the corrupt prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IoiPositions {
    /// The indirect object (the answer), in the introduction.
    pub io: usize,
    /// The subject's first mention, in the introduction.
    pub s1: usize,
    /// The subject's second mention, the giver.
    pub s2: usize,
    /// The last token, where the answer is predicted.
    pub end: usize,
}

/// One generated IOI pair and where its roles sit.
#[derive(Debug, Clone, PartialEq)]
pub struct IoiPair {
    pub pair: PromptPair,
    /// Index into the built-in templates.
    pub template: usize,
    /// Whether the introduction names the indirect object first ("ABBA": "Mary and John …,
    /// John gave … to" → Mary) or the subject first ("BABA").
    pub abba: bool,
    pub positions: IoiPositions,
    /// Tokens of each prompt.
    pub len: usize,
}

impl IoiPair {
    /// The role of every token position of the prompt: "IO", "S1", "S2", "end" or "".
    pub fn labels(&self) -> Vec<&'static str> {
        let mut labels = vec![""; self.len];
        let p = self.positions;
        for (at, role) in [(p.io, "IO"), (p.s1, "S1"), (p.s2, "S2"), (p.end, "end")] {
            labels[at] = role;
        }
        labels
    }
}

/// `n` IOI pairs with the ABC corruption, sampled from `seed`.
pub fn ioi(tok: &Tokenizer, n: usize, seed: u64) -> Result<Vec<PromptPair>> {
    let opts = IoiOptions {
        n,
        seed,
        corruption: Corruption::Abc,
    };
    Ok(ioi_with(tok, &opts)?.into_iter().map(|p| p.pair).collect())
}

/// IOI pairs: each draws a template, ABBA or BABA order, a place, an object and names at random
/// from `seed`, so the first `k` pairs are the same for any `n ≥ k`. Every pair is checked to
/// have equal clean and corrupt token lengths.
pub fn ioi_with(tok: &Tokenizer, opts: &IoiOptions) -> Result<Vec<IoiPair>> {
    if opts.n == 0 {
        return Err(CircuitError::Input("asked for 0 IOI pairs".into()));
    }
    let names = single_tokens(tok, NAMES)?;
    let places = single_tokens(tok, PLACES)?;
    let objects = single_tokens(tok, OBJECTS)?;
    // Two clean names, and up to three fresh ones for the corrupt prompt.
    let needed = match opts.corruption {
        Corruption::Abc => 5,
        Corruption::S2 => 3,
    };
    if names.len() < needed {
        return Err(CircuitError::Input(format!(
            "only {} of the {} built-in names are one token in this tokenizer ({:?}); the {:?} \
             corruption needs {needed}",
            names.len(),
            NAMES.split_whitespace().count(),
            names,
            opts.corruption
        )));
    }
    for (what, list) in [("places", &places), ("objects", &objects)] {
        if list.is_empty() {
            return Err(CircuitError::Input(format!(
                "none of the built-in IOI {what} is one token in this tokenizer"
            )));
        }
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    (1..=opts.n)
        .map(|i| {
            let template = rng.gen_range(0..IOI_TEMPLATES.len());
            let abba = rng.gen_bool(0.5);
            let place = *places.choose(&mut rng).expect("checked non-empty");
            let object = *objects.choose(&mut rng).expect("checked non-empty");
            let drawn: Vec<&str> = names.choose_multiple(&mut rng, needed).copied().collect();
            let (io, s) = (drawn[0], drawn[1]);
            let clean = Fill {
                names: if abba { [io, s] } else { [s, io] },
                s2: s,
                place,
                object,
            };
            let corrupt = match opts.corruption {
                Corruption::Abc => Fill {
                    names: [drawn[2], drawn[3]],
                    s2: drawn[4],
                    ..clean
                },
                Corruption::S2 => Fill {
                    s2: drawn[2],
                    ..clean
                },
            };
            ioi_pair(tok, i, template, abba, [&clean, &corrupt], [io, s])
        })
        .collect()
}

/// The words put into a template.
#[derive(Clone, Copy)]
struct Fill<'a> {
    /// `{A}` and `{B}`, the introduction.
    names: [&'a str; 2],
    /// `{S}`.
    s2: &'a str,
    place: &'a str,
    object: &'a str,
}

impl Fill<'_> {
    /// The filled template and the byte offset of each name slot's leading space: `{A}`, `{B}`,
    /// `{S}`.
    fn apply(&self, template: &str) -> (String, [usize; 3]) {
        let mut text = String::new();
        let mut at = [0; 3];
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').expect("templates close their slots");
            let (word, slot) = match &rest[open + 1..close] {
                "A" => (self.names[0], Some(0)),
                "B" => (self.names[1], Some(1)),
                "S" => (self.s2, Some(2)),
                "PLACE" => (self.place, None),
                "OBJECT" => (self.object, None),
                other => panic!("unknown IOI template slot {{{other}}}"),
            };
            if let Some(slot) = slot {
                at[slot] = text.len() - 1;
            }
            text.push_str(word);
            rest = &rest[close + 1..];
        }
        text.push_str(rest);
        (text, at)
    }
}

/// Pair number `i` (1-based) from its two fills, with the positions of its roles.
fn ioi_pair(
    tok: &Tokenizer,
    i: usize,
    template: usize,
    abba: bool,
    [clean, corrupt]: [&Fill; 2],
    [io, s]: [&str; 2],
) -> Result<IoiPair> {
    let (clean_text, at) = clean.apply(IOI_TEMPLATES[template]);
    let (corrupt_text, _) = corrupt.apply(IOI_TEMPLATES[template]);
    let pair = PromptPair {
        clean: clean_text,
        corrupt: corrupt_text,
        answer: format!(" {io}"),
        wrong: format!(" {s}"),
    };
    let ids = tokenize_pair(tok, i, &pair)
        .map_err(|e| {
            CircuitError::Input(format!(
                "IOI template {template} does not tokenize evenly in this tokenizer: {e}"
            ))
        })?
        .clean;
    // A name's position is the token count of the text before it (its leading space starts a
    // new word, so the prefix tokenizes as it does inside the prompt); checked below.
    let mut pos = [0; 3];
    for (slot, &offset) in at.iter().enumerate() {
        pos[slot] = tok.encode(&pair.clean[..offset], true)?.len();
        let word = [clean.names[0], clean.names[1], clean.s2][slot];
        let expected = tok.encode(&format!(" {word}"), false)?;
        if ids.get(pos[slot]..pos[slot] + 1) != Some(expected.as_slice()) {
            return Err(CircuitError::Input(format!(
                "IOI template {template}: the name {word:?} is not token {} of {:?} in this \
                 tokenizer",
                pos[slot], pair.clean
            )));
        }
    }
    let (io_at, s1_at) = if abba {
        (pos[0], pos[1])
    } else {
        (pos[1], pos[0])
    };
    Ok(IoiPair {
        template,
        abba,
        positions: IoiPositions {
            io: io_at,
            s1: s1_at,
            s2: pos[2],
            end: ids.len() - 1,
        },
        len: ids.len(),
        pair,
    })
}

/// The words of `words` (separated by spaces) that are one token with a leading space.
fn single_tokens(tok: &Tokenizer, words: &'static str) -> Result<Vec<&'static str>> {
    let mut kept = Vec::new();
    for w in words.split_whitespace() {
        if tok.encode(&format!(" {w}"), false)?.len() == 1 {
            kept.push(w);
        }
    }
    Ok(kept)
}

// ---------------------------------------------------------------------------------------------
// Factual recall

/// A relation: a prompt with a subject slot `{}` and facts `(subject, attribute)`; the
/// attribute follows the prompt after a space.
struct Relation {
    prompt: &'static str,
    facts: &'static [(&'static str, &'static str)],
}

const RELATIONS: [Relation; 4] = [
    Relation {
        prompt: "The capital city of {} is",
        facts: &[
            ("France", "Paris"),
            ("Japan", "Tokyo"),
            ("Italy", "Rome"),
            ("Germany", "Berlin"),
            ("Spain", "Madrid"),
            ("Russia", "Moscow"),
            ("China", "Beijing"),
            ("England", "London"),
            ("Egypt", "Cairo"),
            ("Greece", "Athens"),
            ("Canada", "Ottawa"),
            ("Poland", "Warsaw"),
            ("Sweden", "Stockholm"),
            ("Norway", "Oslo"),
            ("Ireland", "Dublin"),
            ("Portugal", "Lisbon"),
            ("Austria", "Vienna"),
            ("Kenya", "Nairobi"),
            ("Peru", "Lima"),
            ("Cuba", "Havana"),
            ("Iran", "Tehran"),
            ("Iraq", "Baghdad"),
            ("Netherlands", "Amsterdam"),
            ("Belgium", "Brussels"),
            ("Denmark", "Copenhagen"),
            ("Finland", "Helsinki"),
            ("Hungary", "Budapest"),
            ("Scotland", "Edinburgh"),
            ("Thailand", "Bangkok"),
            ("Turkey", "Ankara"),
        ],
    },
    Relation {
        prompt: "The official language of {} is",
        facts: &[
            ("France", "French"),
            ("Japan", "Japanese"),
            ("Italy", "Italian"),
            ("Germany", "German"),
            ("Spain", "Spanish"),
            ("Russia", "Russian"),
            ("China", "Chinese"),
            ("Greece", "Greek"),
            ("Portugal", "Portuguese"),
            ("Sweden", "Swedish"),
            ("Poland", "Polish"),
            ("Netherlands", "Dutch"),
            ("Turkey", "Turkish"),
            ("Korea", "Korean"),
            ("Israel", "Hebrew"),
            ("Thailand", "Thai"),
            ("Vietnam", "Vietnamese"),
            ("Norway", "Norwegian"),
            ("Denmark", "Danish"),
            ("Finland", "Finnish"),
            ("Hungary", "Hungarian"),
            ("Egypt", "Arabic"),
        ],
    },
    Relation {
        prompt: "{} is located in the city of",
        facts: &[
            ("The Eiffel Tower", "Paris"),
            ("The Louvre", "Paris"),
            ("The Colosseum", "Rome"),
            ("The Vatican", "Rome"),
            ("Big Ben", "London"),
            ("Buckingham Palace", "London"),
            ("The Brandenburg Gate", "Berlin"),
            ("The Kremlin", "Moscow"),
            ("The Acropolis", "Athens"),
            ("The Parthenon", "Athens"),
            ("The Forbidden City", "Beijing"),
            ("The Sagrada Familia", "Barcelona"),
            ("The Prado Museum", "Madrid"),
            ("The Blue Mosque", "Istanbul"),
            ("The Hagia Sophia", "Istanbul"),
            ("The White House", "Washington"),
            ("The CN Tower", "Toronto"),
            ("Westminster Abbey", "London"),
            ("The Trevi Fountain", "Rome"),
            ("The Burj Khalifa", "Dubai"),
        ],
    },
    Relation {
        prompt: "The opposite of {} is",
        facts: &[
            ("hot", "cold"),
            ("up", "down"),
            ("big", "small"),
            ("day", "night"),
            ("left", "right"),
            ("fast", "slow"),
            ("happy", "sad"),
            ("good", "bad"),
            ("light", "dark"),
            ("old", "new"),
            ("open", "closed"),
            ("rich", "poor"),
            ("love", "hate"),
            ("win", "lose"),
            ("true", "false"),
            ("early", "late"),
        ],
    },
];

/// `n` factual-recall pairs: two subjects of one relation whose prompts have the same token
/// length and whose attributes differ and are one token; the answer is the clean subject's
/// attribute, the wrong one the corrupt subject's. Pairs are drawn without replacement, taking
/// the relations in turn (each shuffled by `seed`); asking for more pairs than exist for this
/// tokenizer is an error that says how many do.
pub fn factual(tok: &Tokenizer, n: usize, seed: u64) -> Result<Vec<PromptPair>> {
    if n == 0 {
        return Err(CircuitError::Input("asked for 0 factual pairs".into()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pools = Vec::with_capacity(RELATIONS.len());
    for rel in &RELATIONS {
        let mut facts = Vec::new();
        for &(subject, attribute) in rel.facts {
            let answer = format!(" {attribute}");
            let prompt = rel.prompt.replace("{}", subject);
            if let Ok(id) = one_token(tok, "attribute", &answer) {
                let len = tok.encode(&prompt, true)?.len();
                facts.push((prompt, answer, id, len));
            }
        }
        let mut pool: Vec<PromptPair> = Vec::new();
        for (clean, answer, a_id, a_len) in &facts {
            for (corrupt, wrong, w_id, w_len) in &facts {
                if a_len == w_len && a_id != w_id {
                    pool.push(PromptPair {
                        clean: clean.clone(),
                        corrupt: corrupt.clone(),
                        answer: answer.clone(),
                        wrong: wrong.clone(),
                    });
                }
            }
        }
        pool.shuffle(&mut rng);
        pools.push(pool.into_iter());
    }
    let total: usize = pools.iter().map(|p| p.len()).sum();
    if n > total {
        return Err(CircuitError::Input(format!(
            "asked for {n} factual pairs, but only {total} distinct ones exist for this tokenizer"
        )));
    }
    let mut pairs = Vec::with_capacity(n);
    // Terminates: n ≤ total.
    'draw: loop {
        for pool in pools.iter_mut() {
            if pairs.len() == n {
                break 'draw;
            }
            pairs.extend(pool.next());
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_well_formed() {
        let fill = Fill {
            names: ["Mary", "John"],
            s2: "John",
            place: "store",
            object: "drink",
        };
        for t in IOI_TEMPLATES {
            for slot in ["{A}", "{B}", "{S}"] {
                assert_eq!(t.matches(slot).count(), 1, "{t}");
                assert!(
                    t.contains(&format!(" {slot}")),
                    "{slot} follows a space in {t}"
                );
            }
            assert!(t.ends_with(" to"), "{t}");
            let (text, at) = fill.apply(t);
            assert!(!text.contains('{'), "{text}");
            assert_eq!(&text[at[0]..at[0] + 5], " Mary");
            assert_eq!(&text[at[1]..at[1] + 5], " John");
            assert_eq!(&text[at[2]..at[2] + 5], " John");
            assert!(at[0] < at[1] && at[1] < at[2], "{t}");
        }
        for o in OBJECTS.split_whitespace() {
            assert!(!o.starts_with(['a', 'e', 'i', 'o', 'u']), "a {o}");
        }
    }

    #[test]
    fn labels_mark_the_roles() {
        let p = IoiPair {
            pair: PromptPair {
                clean: String::new(),
                corrupt: String::new(),
                answer: String::new(),
                wrong: String::new(),
            },
            template: 0,
            abba: true,
            positions: IoiPositions {
                io: 1,
                s1: 3,
                s2: 4,
                end: 5,
            },
            len: 6,
        };
        assert_eq!(p.labels(), ["", "IO", "", "S1", "S2", "end"]);
    }

    #[test]
    fn groups_by_length() {
        let p = |n: usize| TokenPair {
            clean: vec![0; n],
            corrupt: vec![1; n],
            answer: 2,
            wrong: 3,
        };
        let groups = by_length(&[p(5), p(3), p(5)]);
        assert_eq!(groups, [(3, vec![1]), (5, vec![0, 2])]);
    }
}
