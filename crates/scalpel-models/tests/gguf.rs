//! GGUF loading: candle's dequantization of every tensor type against gguf-py's independent one
//! (fixtures from `scripts/make_gguf_fixtures.sh`); a tiny Llama converted at test time the way
//! llama.cpp's `convert_hf_to_gguf.py` converts it, loaded and compared with Hugging Face's
//! logits and hook activations; and clear errors, never panics, on bad files.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture};
use scalpel_core::Hooks;
use scalpel_models::hub::ModelFiles;
use scalpel_models::loader::{load_files, LoadedModel};
use scalpel_models::transformer::RunOptions;

// ---------------------------------------------------------------------------------------------
// Dequantization

/// Types the loader must read (the list); the fixture holds a few more.
const REQUIRED: [GgmlDType; 9] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The largest distance from a value to its quantized copy, as a fraction of the row's largest
/// magnitude: a little above each format's worst rounding (half a step: 1/254 for Q8_0, 1/16 for
/// Q4_0, ...). This only shows that the fixture really holds the pattern in each type, so that
/// agreeing with gguf-py means something.
fn quantization_bound(dtype: GgmlDType) -> f32 {
    match dtype {
        GgmlDType::F32 => 0.0,
        GgmlDType::F16 => 1e-3,
        GgmlDType::BF16 => 1e-2,
        GgmlDType::Q8_0 => 1e-2,
        GgmlDType::Q6K => 2e-2,
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => 4e-2,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 8e-2,
        GgmlDType::Q3K => 0.2,
        _ => 0.4,
    }
}

/// The same bits decoded by two implementations must agree to f32 rounding: the formulas
/// (`d·q`, `d·q − m`, `d·sc·q − dmin·m`) differ only in the order of f32 operations. Tolerance:
/// 4 ulps of the row's largest magnitude, no relative term (after `d·q − m` cancels, the
/// rounding error scales with the block, not the value).
const DEQUANT_ULPS: f32 = 4.0;

#[test]
fn dequantization_matches_gguf_py_for_every_type() {
    let path = fixture("gguf/quant_types.gguf");
    let mut f = File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let refs = candle_core::safetensors::load(
        fixture("gguf/quant_types_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // As the loader reads a tensor.
    let mut dequantize = |name: &str| {
        content
            .tensor(&mut f, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_dtype(DType::F32))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    // Every tensor is the same pattern; the F32 one is it, exactly.
    let source = dequantize("F32");
    let row_max = source.abs().unwrap().max_keepdim(1).unwrap(); // [2, 1]
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let dtype = content.tensor_infos[name].ggml_dtype;
        let got = dequantize(name);
        let expected = refs
            .get(name.as_str())
            .unwrap_or_else(|| panic!("no reference for {name}"));
        let diff = (&got - expected).unwrap().abs().unwrap();
        let worst = diff.broadcast_div(&row_max).unwrap().max_all().unwrap();
        let worst = worst.to_scalar::<f32>().unwrap() / f32::EPSILON;
        eprintln!("{name:5} ({dtype:?}): candle vs gguf-py, worst {worst:.2} ulps of the row max");
        assert!(
            worst <= DEQUANT_ULPS,
            "{name} ({dtype:?}): candle and gguf-py differ by {worst} ulps of the row max"
        );
        let err = (&got - &source)
            .unwrap()
            .abs()
            .unwrap()
            .broadcast_div(&row_max)
            .unwrap();
        let err = err.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            err <= quantization_bound(dtype),
            "{name} ({dtype:?}): quantization error {err} of the row max, bound {}",
            quantization_bound(dtype)
        );
    }
    let types: Vec<GgmlDType> = content
        .tensor_infos
        .values()
        .map(|i| i.ggml_dtype)
        .collect();
    for t in REQUIRED {
        assert!(types.contains(&t), "the fixture has no {t:?} tensor");
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny Llama, converted as llama.cpp converts it

/// Converts `tests/fixtures/models/llama` the way `convert_hf_to_gguf.py` does: llama.cpp tensor
/// names, Q/K rows permuted (unless `permute` is false, for the negative check), matrices stored
/// as `dtype`, 1-D tensors (norms) always F32.
fn convert_llama(dtype: GgmlDType, permute: bool) -> GgufParts {
    let dir = fixture("models/llama");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let int = |k: &str| {
        cfg[k]
            .as_u64()
            .unwrap_or_else(|| panic!("config.json: {k}")) as u32
    };
    let float = |k: &str| {
        cfg[k]
            .as_f64()
            .unwrap_or_else(|| panic!("config.json: {k}")) as f32
    };
    let (n_heads, n_kv_heads) = (int("num_attention_heads"), int("num_key_value_heads"));

    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("scalpel tiny llama".into()),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(float("rope_theta")),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(float("rms_norm_eps")),
        ),
    ];
    // llama.cpp key ← config.json key, all u32.
    for (key, hf) in [
        ("block_count", "num_hidden_layers"),
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("feed_forward_length", "intermediate_size"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("rope.dimension_count", "head_dim"),
    ] {
        meta.push((format!("llama.{key}"), Value::U32(int(hf))));
    }
    meta.extend(tokenizer_metadata(int("vocab_size") as usize));

    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|hf| {
            let name = llama_cpp_name(hf);
            let mut w = weights[hf].to_dtype(DType::F32).unwrap();
            if permute && name.ends_with("attn_q.weight") {
                w = llama_cpp_permute(&w, n_heads as usize);
            } else if permute && name.ends_with("attn_k.weight") {
                w = llama_cpp_permute(&w, n_kv_heads as usize);
            }
            let dtype = if w.rank() == 1 { GgmlDType::F32 } else { dtype };
            (name, QTensor::quantize(&w, dtype).unwrap())
        })
        .collect();
    GgufParts { meta, tensors }
}

/// llama.cpp's `LlamaModel.permute`: `w.reshape(h, 2, dh/2, in).swapaxes(1, 2).reshape(out, in)`,
/// turning each head's half-split rotary rows into interleaved pairs.
///
/// # Shapes
/// `w: [h*dh, in]`
fn llama_cpp_permute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn llama_cpp_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let (layer, module) = hf
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .unwrap_or_else(|| panic!("unexpected tensor {hf}"));
    let short = match module {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("unexpected tensor {hf} ({other})"),
    };
    format!("blk.{layer}.{short}.weight")
}

/// A minimal byte-level ("gpt2") vocabulary of `n` tokens: the 256 byte symbols, merges of
/// letter pairs ("a a", "a b", ...), then BOS and EOS as control tokens.
fn tokenizer_metadata(n: usize) -> Vec<(String, Value)> {
    // GPT-2's byte alphabet: printable bytes as themselves, the other 68 as U+0100 + i. The
    // order of the 256 symbols does not matter to the tokenizer.
    let printable = |b: &u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut tokens: Vec<String> = (0..=255u8)
        .filter(printable)
        .map(|b| char::from(b).to_string())
        .collect();
    tokens.extend((0..68).map(|i| char::from_u32(256 + i).unwrap().to_string()));
    let letters: Vec<char> = ('a'..='p').collect();
    let n_merges = n - 256 - 2;
    let merges: Vec<String> = (0..n_merges)
        .map(|i| format!("{} {}", letters[i / 16], letters[i % 16]))
        .collect();
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    tokens.extend(["<s>".to_string(), "</s>".to_string()]);
    let mut types = vec![1i32; n]; // normal
    types[n - 2] = 3; // control
    types[n - 1] = 3;
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(n as u32 - 2),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(n as u32 - 1),
        ),
    ]
}

/// A GGUF file's metadata and tensors before they are written, for tests to edit.
struct GgufParts {
    meta: Vec<(String, Value)>,
    tensors: Vec<(String, QTensor)>,
}

impl GgufParts {
    fn write(&self, path: &Path) {
        let meta: Vec<(&str, &Value)> = self.meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> =
            self.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut f = File::create(path).unwrap();
        gguf_file::write(&mut f, &meta, &tensors).unwrap();
    }
}

/// Converts with `dtype` and writes `<tmp>/<file>`.
fn converted(tmp: &Path, file: &str, dtype: GgmlDType, permute: bool) -> std::path::PathBuf {
    let path = tmp.join(file);
    convert_llama(dtype, permute).write(&path);
    path
}

fn load_gguf(path: &Path) -> LoadedModel {
    load_files(ModelFiles::Gguf(path.to_path_buf()), &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// Runs the reference batch with every hook cached; returns activations by hook name, plus
/// `logits`.
fn run_all_hooks(lm: &LoadedModel, refs: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let tokens = refs["input_ids"].to_dtype(DType::U32).unwrap();
    let mut hooks = Hooks::new().with_cache(|_| true);
    let logits = lm
        .model
        .forward_with(
            &tokens,
            Some(&refs["attention_mask"]),
            &mut hooks,
            RunOptions::default(),
        )
        .unwrap();
    let cache = hooks.take_cache();
    let mut out: HashMap<String, Tensor> = lm
        .model
        .hook_points()
        .into_iter()
        .filter_map(|hp| Some((hp.to_string(), cache.get(hp)?.clone())))
        .collect();
    out.insert("logits".into(), logits);
    out
}

/// `max |a − e| / (atol + rtol·|e|)` over the values `e` defines (NaN marks padding): the
/// fraction of the tolerance used; above 1 fails. With `(1, 0)` it is the largest |a − e|.
fn tolerance_used(a: &Tensor, e: &Tensor, atol: f32, rtol: f32) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let e = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter()
        .zip(&e)
        .filter(|(_, e)| !e.is_nan())
        .map(|(a, e)| (a - e).abs() / (atol + rtol * e.abs()))
        .fold(0.0, f32::max)
}

/// Compares logits and every hook the reference has; returns how many were compared.
fn check_against_transformers(label: &str, path: &Path, atol: f32, rtol: f32) -> usize {
    let refs = reference();
    let got = run_all_hooks(&load_gguf(path), &refs);
    let mut compared = 0;
    let mut worst = (0.0f32, 0.0f32, String::new());
    for (name, expected) in &refs {
        if name != "logits" && !name.contains("hook") {
            continue;
        }
        let actual = got
            .get(name)
            .unwrap_or_else(|| panic!("{label}: reference hook {name} was not produced"));
        assert_close(&format!("{label} {name}"), actual, expected, atol, rtol);
        let used = tolerance_used(actual, expected, atol, rtol);
        if used > worst.0 {
            worst = (
                used,
                tolerance_used(actual, expected, 1.0, 0.0),
                name.clone(),
            );
        }
        compared += 1;
    }
    eprintln!(
        "{label}: {compared} tensors; worst {} uses {:.0}% of the tolerance (largest |a − e| {:.2e})",
        worst.2,
        100.0 * worst.0,
        worst.1
    );
    compared
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("models/llama/reference.safetensors"), &Device::Cpu)
        .unwrap()
}

#[test]
fn f32_gguf_matches_transformers_on_all_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    let path = converted(tmp.path(), "tiny-llama-f32.gguf", GgmlDType::F32, true);
    let compared = check_against_transformers("F32 GGUF", &path, 1e-4, 1e-4);
    assert!(compared >= 40, "only {compared} tensors compared");
    // hook_q/hook_k were among them: they agree only if the loader undid llama.cpp's permutation.
    let refs = reference();
    for l in 0..2 {
        for h in ["q", "k"] {
            let name = format!("blocks.{l}.attn.hook_{h}");
            assert!(refs.contains_key(&name), "reference lacks {name}");
        }
    }
}

/// F16 weights carry a relative rounding error of up to 2⁻¹¹ ≈ 4.9e-4. Through two layers and
/// the tied unembedding, logits (up to ~22 in magnitude) move by up to 1.27e-2, as much as they
/// do in `transformers` run with the same F16-rounded weights. Tolerance 2e-2 + 2e-2·|e|.
#[test]
fn f16_gguf_matches_transformers_on_all_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    let path = converted(tmp.path(), "tiny-llama-f16.gguf", GgmlDType::F16, true);
    let compared = check_against_transformers("F16 GGUF", &path, 2e-2, 2e-2);
    assert!(compared >= 40, "only {compared} tensors compared");
}

/// Q8_0 matrices (norms stay F32, as llama.cpp keeps them) move the logits of this random model
/// by up to 0.43 (relative RMS 1.9%), the same as `transformers` run with weights round-tripped
/// through gguf-py's Q8_0. Elementwise bounds would be meaningless here; the relative RMS error
/// must stay under 4%, where a wrong block layout or scale gives ~100%.
#[test]
fn q8_0_gguf_logits_are_close_to_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let path = converted(tmp.path(), "tiny-llama-q8_0.gguf", GgmlDType::Q8_0, true);
    let refs = reference();
    let got = run_all_hooks(&load_gguf(&path), &refs);
    let (a, e) = (
        got["logits"].flatten_all().unwrap(),
        refs["logits"].flatten_all().unwrap(),
    );
    let (a, e) = (a.to_vec1::<f32>().unwrap(), e.to_vec1::<f32>().unwrap());
    let (mut err, mut norm) = (0f64, 0f64);
    for (a, e) in a.iter().zip(&e).filter(|(_, e)| !e.is_nan()) {
        err += ((a - e) as f64).powi(2);
        norm += (*e as f64).powi(2);
    }
    let rel = (err / norm).sqrt();
    let max = tolerance_used(&got["logits"], &refs["logits"], 1.0, 0.0);
    eprintln!("Q8_0 GGUF logits: relative RMS error {rel:.2e}, largest |a − e| {max:.2e}");
    assert!(rel < 4e-2, "Q8_0 logits: relative RMS error {rel}");
}

/// The checks above can fail: a file whose Q/K rows were not permuted (as a converter that forgot
/// to would write it) loads, but its queries and keys are scrambled.
#[test]
fn unpermuted_qk_rows_are_detected_by_the_hook_check() {
    let tmp = tempfile::tempdir().unwrap();
    let path = converted(tmp.path(), "unpermuted.gguf", GgmlDType::F32, false);
    let refs = reference();
    let got = run_all_hooks(&load_gguf(&path), &refs);
    for name in ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "logits"] {
        // Even the F16 tolerance is exceeded.
        let used = tolerance_used(&got[name], &refs[name], 2e-2, 2e-2);
        assert!(
            used > 1.0,
            "{name} agrees although Q/K rows were left permuted"
        );
    }
    // The converter does not permute V, so layer 0's values still agree.
    let v = "blocks.0.attn.hook_v";
    assert_close("unpermuted hook_v", &got[v], &refs[v], 1e-4, 1e-4);
}

#[test]
fn gguf_tokenizer_is_rebuilt_from_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let path = converted(tmp.path(), "tiny-llama-f32.gguf", GgmlDType::F32, true);
    let lm = load_gguf(&path);
    let tok = lm.tokenizer().unwrap();
    assert_eq!(tok.vocab_size(), 512);
    // "a b" (rank 1) and "c d" (rank 35) merge; "ab cd" is not a merge.
    let ids = tok.encode("abcd", false).unwrap();
    assert_eq!(tok.token_strings(&ids), ["ab", "cd"]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "abcd");
    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.eos_ids(), [511]);
}

// ---------------------------------------------------------------------------------------------
// Bad files

/// Loads `path`, expecting an error; a panic fails the test with its message.
fn load_error(path: &Path) -> String {
    let result =
        std::panic::catch_unwind(|| load_files(ModelFiles::Gguf(path.to_path_buf()), &Device::Cpu));
    match result {
        Ok(Ok(_)) => panic!("{} loaded although it is broken", path.display()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!(
            "loading {} panicked instead of returning an error",
            path.display()
        ),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention {p:?}: {err}");
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gguf = convert_llama(GgmlDType::F32, true);
    for (key, value) in gguf.meta.iter_mut() {
        if key == "general.architecture" {
            *value = Value::String("bert".into());
        }
    }
    let path = tmp.path().join("bert.gguf");
    gguf.write(&path);
    let err = load_error(&path);
    assert_mentions(
        &err,
        &["bert.gguf", "unsupported GGUF architecture `bert`", "llama"],
    );
}

#[test]
fn unknown_tensor_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = converted(tmp.path(), "unknown-type.gguf", GgmlDType::F32, true);
    // A tensor info is: name (u64 length + bytes), n_dims (u32), dims (u64 each), type (u32).
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.0.attn_v.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    assert_eq!(
        bytes[type_at..type_at + 4],
        0u32.to_le_bytes(),
        "expected F32's type id 0"
    );
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let err = load_error(&path);
    assert_mentions(
        &err,
        &[
            "unknown-type.gguf",
            "blk.0.attn_v.weight",
            "type id 99",
            "Q4_K",
        ],
    );
}

#[test]
fn truncated_file_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = converted(tmp.path(), "truncated.gguf", GgmlDType::F32, true);
    let content = gguf_file::Content::read(&mut File::open(&path).unwrap()).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    // Cut halfway through the tensor data.
    let cut = content.tensor_data_offset + (len - content.tensor_data_offset) / 2;
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let err = load_error(&path);
    assert_mentions(&err, &["truncated.gguf", "tensor `"]);
    // Cut inside the metadata: the header no longer parses.
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(200)
        .unwrap();
    let err = load_error(&path);
    assert_mentions(&err, &["truncated.gguf", "not a readable GGUF file"]);
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gguf = convert_llama(GgmlDType::F32, true);
    gguf.tensors.retain(|(n, _)| n != "blk.1.ffn_down.weight");
    let path = tmp.path().join("missing.gguf");
    gguf.write(&path);
    let err = load_error(&path);
    assert_mentions(&err, &["blk.1.ffn_down.weight", "missing", "missing.gguf"]);
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gguf = convert_llama(GgmlDType::F32, true);
    // attn_k: [n_kv_heads·d_head, d_model] = [32, 64]; store [16, 64].
    let wrong = Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap();
    for (name, t) in gguf.tensors.iter_mut() {
        if name == "blk.0.attn_k.weight" {
            *t = QTensor::quantize(&wrong, GgmlDType::F32).unwrap();
        }
    }
    let path = tmp.path().join("wrong-shape.gguf");
    gguf.write(&path);
    let err = load_error(&path);
    assert_mentions(&err, &["blk.0.attn_k.weight", "[32, 64]", "[16, 64]"]);
}
