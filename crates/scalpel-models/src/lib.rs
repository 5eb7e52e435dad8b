//! `scalpel-models`: the canonical hooked transformer, its configs, loaders (Hugging Face
//! directories, GGUF files, the hub), tokenizers, chat templates and generation.

pub mod chat;
pub mod error;
pub mod generation;
pub mod hub;
pub mod tokenizer;
pub mod transformer;
pub mod config;
pub mod loader;

pub use error::{ModelError, Result};
