//! Writes `tests/fixtures/gguf/quant_types.gguf`: the same small `[2, 256]` tensor stored once in
//! every GGUF tensor type that candle writes and gguf-py can dequantize, quantized by candle.
//! `scripts/dequant_reference.py` then dequantizes it with gguf-py (an independent, numpy
//! implementation) and `tests/gguf.rs` compares candle's dequantization with that.
//!
//! Run through `scripts/make_gguf_fixtures.sh`, or:
//! `cargo run --release -p scalpel-models --example make_gguf_quant_fixture [OUT.gguf]`

use std::path::PathBuf;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Tensor name → type. Names are gguf-py's type names so the reference keys read naturally.
const TYPES: [(&str, GgmlDType); 13] = [
    ("F32", GgmlDType::F32),
    ("F16", GgmlDType::F16),
    ("BF16", GgmlDType::BF16),
    ("Q8_0", GgmlDType::Q8_0),
    ("Q4_0", GgmlDType::Q4_0),
    ("Q4_1", GgmlDType::Q4_1),
    ("Q5_0", GgmlDType::Q5_0),
    ("Q5_1", GgmlDType::Q5_1),
    ("Q2_K", GgmlDType::Q2K),
    ("Q3_K", GgmlDType::Q3K),
    ("Q4_K", GgmlDType::Q4K),
    ("Q5_K", GgmlDType::Q5K),
    ("Q6_K", GgmlDType::Q6K),
];

/// `[2, 256]`: K-quant blocks span 256 values, so each row is one super-block. Every 32-value
/// block gets its own magnitude (1e-3 to 30) and offset, so that block scales, minima and the
/// 6-bit sub-block scales of the K-quants all vary. Plain arithmetic: no RNG to drift.
fn pattern() -> Vec<f32> {
    const MAGNITUDE: [f32; 8] = [1.0, 0.001, 30.0, 0.2, 4.0, 0.05, 12.0, 0.7];
    (0..512)
        .map(|i| {
            let block = i / 32;
            let m = MAGNITUDE[block % 8];
            let offset = 0.4 * m * (block as f32 * 1.3).cos();
            m * (0.37 * i as f32 + 0.5 * block as f32).sin() + offset
        })
        .collect()
}

fn main() -> candle_core::Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/quant_types.gguf")
        });
    let src = Tensor::from_vec(pattern(), (2, 256), &Device::Cpu)?;
    let tensors = TYPES
        .iter()
        .map(|&(name, dtype)| Ok((name, QTensor::quantize(&src, dtype)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let arch = gguf_file::Value::String("scalpel-quant-fixture".into());
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::create(&out)?;
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &refs)?;
    println!("wrote {} ({} tensors)", out.display(), refs.len());
    Ok(())
}
