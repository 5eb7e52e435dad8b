//! Corpus readers against the fixtures of `scripts/make_corpus_fixtures.py`, and their errors.

use std::path::{Path, PathBuf};

use scalpel_data::corpus::{corpus_hash, open, Document};
use scalpel_data::DataError;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/corpus")
        .join(rel)
}

fn read_all(spec: &Path, field: &str) -> Vec<Document> {
    open(spec, field)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", spec.display()))
}

fn texts(docs: &[Document]) -> Vec<&str> {
    docs.iter().map(|d| d.text.as_str()).collect()
}

/// The first error of reading `spec`, as text.
fn first_error(spec: &Path, field: &str) -> String {
    match open(spec, field) {
        Err(e) => e.to_string(),
        Ok(mut docs) => match docs.find_map(Result::err) {
            Some(e) => e.to_string(),
            None => panic!("{}: no error", spec.display()),
        },
    }
}

#[test]
fn jsonl_documents_and_sources() {
    let docs = read_all(&fixture("docs.jsonl"), "text");
    assert_eq!(
        texts(&docs),
        [
            "The capital of France is Paris.",
            "Cats sleep for most of the day.",
            "Numbers: 12345 and 678.",
            "Unicode survives: café, naïve, 東京.",
        ]
    );
    let sources: Vec<Option<&str>> = docs.iter().map(|d| d.source.as_deref()).collect();
    assert_eq!(
        sources,
        [Some("wiki/france"), None, Some("synthetic"), None]
    );
}

#[test]
fn text_files_of_a_directory_in_order() {
    let docs = read_all(&fixture("dir"), "text");
    assert_eq!(
        texts(&docs),
        [
            "Once upon a time there was a small model.\nIt read every line.\n",
            "A second file, a second document.\n",
        ]
    );
    assert!(docs[0].source.as_deref().unwrap().ends_with("a.txt"));
    assert!(docs[1].source.as_deref().unwrap().ends_with("b.txt"));
}

#[test]
fn parquet_utf8_and_large_utf8_columns_across_row_groups() {
    let docs = read_all(&fixture("docs.parquet"), "text");
    assert_eq!(
        texts(&docs),
        [
            "First parquet document.",
            "Second parquet document.",
            "Third one, in the second row group.",
            "Fourth.",
            "Fifth and last.",
        ]
    );
    // `body` is large_utf8 with row 1 null: skipped.
    let docs = read_all(&fixture("docs.parquet"), "body");
    assert_eq!(
        texts(&docs),
        [
            "FIRST PARQUET DOCUMENT.",
            "THIRD ONE, IN THE SECOND ROW GROUP.",
            "FOURTH.",
            "FIFTH AND LAST.",
        ]
    );
}

#[test]
fn parquet_column_errors() {
    let msg = first_error(&fixture("docs.parquet"), "content");
    assert!(msg.contains("docs.parquet"), "{msg}");
    assert!(
        msg.contains("no column `content`") && msg.contains("text, body, n"),
        "{msg}"
    );
    let msg = first_error(&fixture("docs.parquet"), "n");
    assert!(msg.contains("`n` holds Int64"), "{msg}");
}

#[test]
fn jsonl_errors_name_file_and_line_and_end_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"text\": \"ok\"}\n\n{not json\n{\"text\": \"after\"}\n",
    )
    .unwrap();
    let results: Vec<_> = open(&path, "text").unwrap().collect();
    assert_eq!(results.len(), 2, "the stream ends at the error");
    assert_eq!(results[0].as_ref().unwrap().text, "ok");
    let err = results[1].as_ref().unwrap_err();
    assert!(matches!(err, DataError::BadFile { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("bad.jsonl") && msg.contains("line 3:"),
        "{msg}"
    );

    std::fs::write(&path, "{\"body\": \"x\", \"id\": 3}\n").unwrap();
    let msg = first_error(&path, "text");
    assert!(
        msg.contains("line 1: no field `text` (fields: body, id)"),
        "{msg}"
    );
    std::fs::write(&path, "{\"text\": 5}\n").unwrap();
    let msg = first_error(&path, "text");
    assert!(msg.contains("`text` is a number, not a string"), "{msg}");
    std::fs::write(&path, "[1, 2]\n").unwrap();
    let msg = first_error(&path, "text");
    assert!(msg.contains("line 1: not a JSON object"), "{msg}");
}

#[test]
fn directories_are_read_recursively_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("b/inner")).unwrap();
    std::fs::create_dir_all(root.join(".hidden")).unwrap();
    std::fs::write(root.join("c.txt"), "c").unwrap();
    std::fs::write(
        root.join("b/inner/x.jsonl"),
        "{\"text\": \"x1\"}\n{\"text\": \"x2\"}\n",
    )
    .unwrap();
    std::fs::write(root.join("b/a.txt"), "b/a").unwrap();
    std::fs::write(root.join("a.TXT"), "a").unwrap();
    std::fs::write(root.join("notes.md"), "not a corpus file").unwrap();
    std::fs::write(root.join(".hidden/h.txt"), "hidden").unwrap();
    std::fs::copy(fixture("docs.parquet"), root.join("b/p.parquet")).unwrap();
    let docs = read_all(root, "text");
    assert_eq!(
        texts(&docs),
        [
            "a",
            "b/a",
            "x1",
            "x2",
            "First parquet document.",
            "Second parquet document.",
            "Third one, in the second row group.",
            "Fourth.",
            "Fifth and last.",
            "c",
        ]
    );
    // A bad file deep in a directory surfaces when the stream reaches it.
    std::fs::write(root.join("b/inner/x.jsonl"), "oops\n").unwrap();
    let results: Vec<_> = open(root, "text").unwrap().collect();
    assert_eq!(results.len(), 3);
    let msg = results[2].as_ref().unwrap_err().to_string();
    assert!(msg.contains("x.jsonl") && msg.contains("line 1"), "{msg}");
}

#[test]
fn unusable_specs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let msg = first_error(dir.path(), "text");
    assert!(msg.contains("no .txt, .jsonl or .parquet files"), "{msg}");
    let md = dir.path().join("notes.md");
    std::fs::write(&md, "x").unwrap();
    let msg = first_error(&md, "text");
    assert!(msg.contains("notes.md") && msg.contains(".jsonl"), "{msg}");
    let missing = dir.path().join("missing.jsonl");
    assert!(matches!(open(&missing, "text"), Err(DataError::Io { .. })));
    assert!(matches!(corpus_hash(&missing), Err(DataError::Io { .. })));
    let not_parquet = dir.path().join("fake.parquet");
    std::fs::write(&not_parquet, "not parquet at all").unwrap();
    let msg = first_error(&not_parquet, "text");
    assert!(msg.contains("fake.parquet"), "{msg}");
}

#[test]
fn corpus_hash_follows_names_and_contents_not_location() {
    let hash = corpus_hash(&fixture("dir")).unwrap();
    assert_eq!(hash.len(), 64);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(corpus_hash(&fixture("dir")).unwrap(), hash);

    // A copy elsewhere hashes the same.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for name in ["a.txt", "b.txt"] {
        std::fs::copy(fixture("dir").join(name), copy.join(name)).unwrap();
    }
    assert_eq!(corpus_hash(&copy).unwrap(), hash);
    // Files open() ignores do not count.
    std::fs::write(copy.join("README.md"), "ignored").unwrap();
    assert_eq!(corpus_hash(&copy).unwrap(), hash);

    // One changed byte, a renamed file, or moving bytes between files change it.
    let a = std::fs::read_to_string(copy.join("a.txt")).unwrap();
    std::fs::write(copy.join("a.txt"), a.replacen("small", "smalL", 1)).unwrap();
    let changed = corpus_hash(&copy).unwrap();
    assert_ne!(changed, hash);
    std::fs::rename(copy.join("a.txt"), copy.join("a2.txt")).unwrap();
    assert_ne!(corpus_hash(&copy).unwrap(), changed);

    let split = |x: &str, y: &str| {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.txt"), x).unwrap();
        std::fs::write(d.path().join("y.txt"), y).unwrap();
        corpus_hash(d.path()).unwrap()
    };
    assert_ne!(split("ab", "c"), split("a", "bc"));

    // A single file: its name and bytes.
    let one = corpus_hash(&fixture("docs.jsonl")).unwrap();
    assert_ne!(one, hash);
    std::fs::copy(fixture("docs.jsonl"), dir.path().join("docs.jsonl")).unwrap();
    assert_eq!(corpus_hash(&dir.path().join("docs.jsonl")).unwrap(), one);
}
