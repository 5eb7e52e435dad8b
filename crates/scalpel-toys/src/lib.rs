//! Toy models grown from scratch, and the analyses that find their mechanisms: superposition in a
//! ReLU-output model (Elhage et al. 2022), induction heads in a two-layer attention-only
//! transformer (Olsson et al. 2022), grokking of modular addition (Nanda et al. 2023), and a
//! diagnosis that tells a memorising network from a generalising one from the inside.

pub mod error;
pub mod plot;
pub mod report;

pub use error::{Result, ToyError};
pub mod checkpoint;
pub mod diagnose;
pub mod fused;
pub mod grokking;
pub mod induction;
pub mod optim;
pub mod superposition;
pub mod transformer;
