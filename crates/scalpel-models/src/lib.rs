//! `scalpel-models`: the canonical hooked transformer, its configs, loaders (Hugging Face
//! directories, GGUF files, the hub), tokenizers, chat templates and generation.

pub mod chat;
pub mod config;
pub mod error;
pub mod files;
pub mod generation;
pub mod hub;
mod kernels;
pub mod loader;
pub mod tokenizer;
pub mod transformer;

pub use error::{ModelError, Result};
