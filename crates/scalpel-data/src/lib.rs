//! `scalpel-data`: corpora (plain text, JSONL, Parquet), tokenisation and packing into fixed
//! contexts, the demo corpus, and the on-disk activation store that dictionary training reads.

pub mod corpus;
pub mod demo;
pub mod error;
pub mod harvest;
pub mod packing;
pub mod store;

pub use error::{DataError, Result};
