//! Loaders: Hugging Face directories (single or sharded safetensors, memory-mapped), GGUF files
//! (dequantized to f32 at load) and random initialisation, all handing canonical weights to
//! [`Model::load`].

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::{Act, Config, Mlp, Norm, Pos};
use crate::hub::{self, ModelFiles};
use crate::tokenizer::Tokenizer;
use crate::transformer::{Model, WeightSource};
use crate::{ModelError, Result};

/// One tensor as stored in a checkpoint, for `scalpel inspect`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// A model, its tokenizer, and where they came from.
pub struct LoadedModel {
    pub model: Model,
    /// Absent only for checkpoints that ship no tokenizer (such as test fixtures).
    pub tokenizer: Option<Tokenizer>,
    pub files: ModelFiles,
    /// The checkpoint's tensors as stored (name, dtype, shape).
    pub stored: Vec<StoredTensor>,
}

impl LoadedModel {
    /// The tokenizer, or a clear error for checkpoints without one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::Input("this model has no tokenizer; pass token ids".into()))
    }
}

/// Loads a model named by a spec: `smollm2-135m`, `hf:org/name[@rev]`, a directory, a `.gguf`.
pub fn load(spec: &str, device: &Device) -> Result<LoadedModel> {
    let files = hub::resolve(spec)?;
    load_files(files, device)
}

/// Loads already-resolved files.
pub fn load_files(files: ModelFiles, device: &Device) -> Result<LoadedModel> {
    match &files {
        ModelFiles::HfDir(dir) => {
            let (model, stored) = load_hf_dir(dir, device)?;
            let tokenizer = if dir.join("tokenizer.json").exists() {
                Some(Tokenizer::from_hf_dir(dir)?)
            } else {
                None
            };
            Ok(LoadedModel {
                model,
                tokenizer,
                files,
                stored,
            })
        }
        ModelFiles::Gguf(path) => {
            let mut f = File::open(path).map_err(|e| ModelError::io(path, e))?;
            let content = gguf_file::Content::read(&mut f).map_err(|e| gguf_read_error(path, e))?;
            let cfg = config_from_gguf(&content, path)?;
            let tokenizer = Tokenizer::from_gguf(&content)?;
            let stored = gguf_stored(&content);
            let mut src = GgufSource {
                path: path.clone(),
                file: f,
                unpermute_qk: gguf_str(&content, "general.architecture") == Some("llama"),
                content,
                cfg: cfg.clone(),
            };
            let model = Model::load(cfg, &mut src, device)?;
            Ok(LoadedModel {
                model,
                tokenizer: Some(tokenizer),
                files,
                stored,
            })
        }
    }
}

/// Reads `config.json` and the safetensors of a Hugging Face directory.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<(Model, Vec<StoredTensor>)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let cfg = Config::from_hf_json(&text).map_err(|e| match e {
        ModelError::Config(m) => ModelError::bad_file(&cfg_path, m),
        other => other,
    })?;
    let paths = safetensors_files(dir)?;
    // SAFETY: the files are mapped read-only; as with every memory-mapped loader, the caller must
    // not truncate them while the model is loading. Every tensor is copied out before we return.
    let st = unsafe { MmapedSafetensors::multi(&paths) }
        .map_err(|e| ModelError::bad_file(dir, format!("unreadable safetensors: {e}")))?;
    let mut stored: Vec<StoredTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| StoredTensor {
            name,
            dtype: format!("{:?}", view.dtype()),
            shape: view.shape().to_vec(),
        })
        .collect();
    stored.sort_by(|a, b| a.name.cmp(&b.name));
    let gpt2 = cfg.family == "gpt2";
    let mut src = SafetensorsSource {
        st,
        dir: dir.to_path_buf(),
        gpt2,
        prefix: String::new(),
    };
    if gpt2 && src.st.get("transformer.wte.weight").is_ok() {
        src.prefix = "transformer.".into();
    }
    let model = Model::load(cfg, &mut src, device)?;
    Ok((model, stored))
}

/// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(ModelError::bad_file(
            dir,
            "no model.safetensors nor model.safetensors.index.json",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::bad_file(&index, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::bad_file(&index, "no `weight_map` object"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.exists()) {
        return Err(ModelError::bad_file(
            missing,
            "shard named in the index is missing",
        ));
    }
    Ok(paths)
}

fn check_shape(name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found != expected {
        return Err(ModelError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

/// How a canonical weight is found in a checkpoint.
enum Stored {
    /// Same orientation.
    Plain(String),
    /// Stored `[in, out]` (GPT-2's Conv1D): transpose.
    Transposed(String),
    /// Rows `[part*n, (part+1)*n)` of a fused q/k/v matrix stored `[in, 3n]` (or a `[3n]` bias).
    FusedQkv(String, usize),
}

struct SafetensorsSource {
    st: MmapedSafetensors,
    dir: PathBuf,
    gpt2: bool,
    prefix: String,
}

impl SafetensorsSource {
    fn locate(&self, canonical: &str) -> Stored {
        if self.gpt2 {
            gpt2_name(canonical, &self.prefix)
        } else {
            Stored::Plain(llama_hf_name(canonical))
        }
    }

    fn raw(&self, name: &str, dev: &Device) -> Result<Tensor> {
        if self.st.get(name).is_err() {
            return Err(ModelError::MissingTensor {
                name: name.to_string(),
                source_desc: self.dir.display().to_string(),
            });
        }
        let t = self
            .st
            .load(name, dev)
            .map_err(|e| ModelError::bad_file(&self.dir, format!("tensor `{name}`: {e}")))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&mut self, canonical: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        match self.locate(canonical) {
            Stored::Plain(n) => {
                let t = self.raw(&n, dev)?;
                check_shape(&n, t.dims(), shape)?;
                Ok(t)
            }
            Stored::Transposed(n) => {
                let t = self.raw(&n, dev)?;
                let want: Vec<usize> = shape.iter().rev().copied().collect();
                check_shape(&n, t.dims(), &want)?;
                Ok(t.t()?.contiguous()?)
            }
            Stored::FusedQkv(n, part) => {
                let t = self.raw(&n, dev)?;
                let rows = shape[0];
                if shape.len() == 1 {
                    check_shape(&n, t.dims(), &[3 * rows])?;
                    Ok(t.narrow(0, part * rows, rows)?.contiguous()?)
                } else {
                    check_shape(&n, t.dims(), &[shape[1], 3 * rows])?;
                    Ok(t.narrow(1, part * rows, rows)?.t()?.contiguous()?)
                }
            }
        }
    }
}

/// Splits `blocks.{l}.{rest}` into `(l, rest)`.
fn split_block(canonical: &str) -> Option<(usize, &str)> {
    let rest = canonical.strip_prefix("blocks.")?;
    let (l, rest) = rest.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

/// `.w` → `weight`, `.b` → `bias`.
fn wb(s: &str) -> (&str, &str) {
    match s.rsplit_once('.') {
        Some((base, "w")) => (base, "weight"),
        Some((base, "b")) => (base, "bias"),
        _ => (s, ""),
    }
}

/// Hugging Face names of the Llama family (Llama, Mistral, Qwen2).
fn llama_hf_name(canonical: &str) -> String {
    match canonical {
        "embed.w" => return "model.embed_tokens.weight".into(),
        "ln_final.w" => return "model.norm.weight".into(),
        "unembed.w" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some((l, rest)) = split_block(canonical) else {
        return canonical.to_string();
    };
    let (base, kind) = wb(rest);
    let module = match base {
        "ln1" => "input_layernorm".to_string(),
        "ln2" => "post_attention_layernorm".to_string(),
        "attn.q" => "self_attn.q_proj".into(),
        "attn.k" => "self_attn.k_proj".into(),
        "attn.v" => "self_attn.v_proj".into(),
        "attn.o" => "self_attn.o_proj".into(),
        "mlp.gate" => "mlp.gate_proj".into(),
        "mlp.in" => "mlp.up_proj".into(),
        "mlp.out" => "mlp.down_proj".into(),
        other => other.to_string(),
    };
    format!("model.layers.{l}.{module}.{kind}")
}

/// GPT-2 names (Conv1D weights are stored `[in, out]`; q, k, v are fused in `c_attn`).
fn gpt2_name(canonical: &str, prefix: &str) -> Stored {
    let p = |s: &str| format!("{prefix}{s}");
    match canonical {
        "embed.w" => return Stored::Plain(p("wte.weight")),
        "pos_embed.w" => return Stored::Plain(p("wpe.weight")),
        "ln_final.w" => return Stored::Plain(p("ln_f.weight")),
        "ln_final.b" => return Stored::Plain(p("ln_f.bias")),
        "unembed.w" => return Stored::Plain("lm_head.weight".into()),
        _ => {}
    }
    let Some((l, rest)) = split_block(canonical) else {
        return Stored::Plain(canonical.to_string());
    };
    let (base, kind) = wb(rest);
    let h = |m: &str| p(&format!("h.{l}.{m}.{kind}"));
    let conv = |m: &str| {
        if kind == "weight" {
            Stored::Transposed(h(m))
        } else {
            Stored::Plain(h(m))
        }
    };
    match base {
        "ln1" => Stored::Plain(h("ln_1")),
        "ln2" => Stored::Plain(h("ln_2")),
        "attn.q" => Stored::FusedQkv(h("attn.c_attn"), 0),
        "attn.k" => Stored::FusedQkv(h("attn.c_attn"), 1),
        "attn.v" => Stored::FusedQkv(h("attn.c_attn"), 2),
        "attn.o" => conv("attn.c_proj"),
        "mlp.in" => conv("mlp.c_fc"),
        "mlp.out" => conv("mlp.c_proj"),
        other => Stored::Plain(other.to_string()),
    }
}

/// GGUF tensor names (llama.cpp's convention).
fn gguf_name(canonical: &str) -> String {
    match canonical {
        "embed.w" => return "token_embd.weight".into(),
        "ln_final.w" => return "output_norm.weight".into(),
        "unembed.w" => return "output.weight".into(),
        _ => {}
    }
    let Some((l, rest)) = split_block(canonical) else {
        return canonical.to_string();
    };
    let (base, kind) = wb(rest);
    let module = match base {
        "ln1" => "attn_norm",
        "ln2" => "ffn_norm",
        "attn.q" => "attn_q",
        "attn.k" => "attn_k",
        "attn.v" => "attn_v",
        "attn.o" => "attn_output",
        "mlp.gate" => "ffn_gate",
        "mlp.in" => "ffn_up",
        "mlp.out" => "ffn_down",
        other => other,
    };
    format!("blk.{l}.{module}.{kind}")
}

struct GgufSource {
    path: PathBuf,
    file: File,
    content: gguf_file::Content,
    cfg: Config,
    unpermute_qk: bool,
}

impl WeightSource for GgufSource {
    fn get(&mut self, canonical: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let name = gguf_name(canonical);
        if !self.content.tensor_infos.contains_key(&name) {
            return Err(ModelError::MissingTensor {
                name,
                source_desc: self.path.display().to_string(),
            });
        }
        let q = self
            .content
            .tensor(&mut self.file, &name, dev)
            .map_err(|e| ModelError::bad_file(&self.path, format!("tensor `{name}`: {e}")))?;
        let t = q
            .dequantize(dev)
            .map_err(|e| ModelError::bad_file(&self.path, format!("tensor `{name}`: {e}")))?
            .to_dtype(DType::F32)?;
        check_shape(&name, t.dims(), shape)?;
        let heads = if canonical.ends_with("attn.q.w") || canonical.ends_with("attn.q.b") {
            Some(self.cfg.n_heads)
        } else if canonical.ends_with("attn.k.w") || canonical.ends_with("attn.k.b") {
            Some(self.cfg.n_kv_heads)
        } else {
            None
        };
        match heads {
            Some(h) if self.unpermute_qk => unpermute_rotary_rows(&t, h),
            _ => Ok(t),
        }
    }
}

/// Undoes llama.cpp's reordering of Q/K rows: its converter turns each head's half-split rotary
/// layout `[x0..x(dh/2), y0..y(dh/2)]` into an interleaved one `[x0, y0, x1, y1, ...]`.
///
/// # Shapes
/// `t: [heads*dh, in]` or `[heads*dh]`.
pub fn unpermute_rotary_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let dh = out / heads;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut s1 = vec![heads, dh / 2, 2];
    s1.extend(&rest);
    Ok(t.reshape(s1)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Names the tensor when candle refuses a GGML type it does not know (IQ*, TQ*, MXFP4...).
fn gguf_read_error(path: &Path, e: candle_core::Error) -> ModelError {
    let msg = e.to_string();
    let msg = msg.lines().next().unwrap_or("").to_string();
    if let Some(id) = msg
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        let which = gguf_tensor_with_type(path, id)
            .map(|n| format!("tensor `{n}` has"))
            .unwrap_or_else(|| "a tensor has".into());
        return ModelError::bad_file(
            path,
            format!(
                "{which} GGML type id {id}, which scalpel cannot read (supported: F32, F16, BF16, \
                 Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)"
            ),
        );
    }
    ModelError::bad_file(path, format!("not a readable GGUF file: {msg}"))
}

/// Walks a GGUF header (v2/v3) to find the first tensor stored with GGML type `id`.
fn gguf_tensor_with_type(path: &Path, id: u32) -> Option<String> {
    use std::io::Read;
    fn u32_(r: &mut impl Read) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_(r: &mut impl Read) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn string(r: &mut impl Read) -> Option<String> {
        let n = u64_(r)?;
        if n > 1 << 20 {
            return None;
        }
        let mut b = vec![0u8; n as usize];
        r.read_exact(&mut b).ok()?;
        String::from_utf8(b).ok()
    }
    fn skip_value(r: &mut impl Read, ty: u32) -> Option<()> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => return string(r).map(|_| ()),
            9 => {
                let inner = u32_(r)?;
                let n = u64_(r)?;
                for _ in 0..n {
                    skip_value(r, inner)?;
                }
                return Some(());
            }
            _ => return None,
        };
        let mut b = [0u8; 8];
        r.read_exact(&mut b[..fixed]).ok()
    }
    let mut r = std::io::BufReader::new(File::open(path).ok()?);
    if u32_(&mut r)? != 0x4655_4747 || u32_(&mut r)? < 2 {
        return None;
    }
    let (n_tensors, n_kv) = (u64_(&mut r)?, u64_(&mut r)?);
    for _ in 0..n_kv {
        string(&mut r)?;
        let ty = u32_(&mut r)?;
        skip_value(&mut r, ty)?;
    }
    for _ in 0..n_tensors {
        let name = string(&mut r)?;
        let n_dims = u32_(&mut r)?;
        for _ in 0..n_dims {
            u64_(&mut r)?;
        }
        let ty = u32_(&mut r)?;
        u64_(&mut r)?;
        if ty == id {
            return Some(name);
        }
    }
    None
}

fn gguf_str<'a>(c: &'a gguf_file::Content, key: &str) -> Option<&'a str> {
    match c.metadata.get(key) {
        Some(gguf_file::Value::String(s)) => Some(s.as_str()),
        _ => None,
    }
}

fn gguf_num(c: &gguf_file::Content, key: &str) -> Option<f64> {
    use gguf_file::Value as V;
    Some(match c.metadata.get(key)? {
        V::U8(x) => *x as f64,
        V::I8(x) => *x as f64,
        V::U16(x) => *x as f64,
        V::I16(x) => *x as f64,
        V::U32(x) => *x as f64,
        V::I32(x) => *x as f64,
        V::U64(x) => *x as f64,
        V::I64(x) => *x as f64,
        V::F32(x) => *x as f64,
        V::F64(x) => *x,
        _ => return None,
    })
}

/// Builds the model config from a GGUF file's metadata.
pub fn config_from_gguf(c: &gguf_file::Content, path: &Path) -> Result<Config> {
    let arch = gguf_str(c, "general.architecture")
        .ok_or_else(|| ModelError::bad_file(path, "GGUF metadata lacks general.architecture"))?;
    if !matches!(arch, "llama" | "qwen2" | "mistral") {
        return Err(ModelError::bad_file(
            path,
            format!("unsupported GGUF architecture `{arch}` (supported: llama, mistral, qwen2)"),
        ));
    }
    let need = |k: &str| {
        gguf_num(c, &format!("{arch}.{k}"))
            .ok_or_else(|| ModelError::bad_file(path, format!("GGUF metadata lacks {arch}.{k}")))
    };
    let d_model = need("embedding_length")? as usize;
    let n_heads = need("attention.head_count")? as usize;
    if n_heads == 0 {
        return Err(ModelError::bad_file(path, "attention.head_count is 0"));
    }
    let n_kv_heads =
        gguf_num(c, &format!("{arch}.attention.head_count_kv")).map_or(n_heads, |x| x as usize);
    let d_head = gguf_num(c, &format!("{arch}.attention.key_length"))
        .map_or(d_model / n_heads, |x| x as usize);
    let d_vocab = match c.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims()[0],
        None => {
            return Err(ModelError::MissingTensor {
                name: "token_embd.weight".into(),
                source_desc: path.display().to_string(),
            })
        }
    };
    if c.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ModelError::bad_file(
            path,
            "per-frequency rope factors (rope_freqs.weight) are not supported yet",
        ));
    }
    let scaling = match gguf_str(c, &format!("{arch}.rope.scaling.type")) {
        None | Some("none") => None,
        Some("linear") => Some(crate::config::RopeScaling::Linear {
            factor: need("rope.scaling.factor")?,
        }),
        Some(other) => {
            return Err(ModelError::bad_file(
                path,
                format!("unsupported rope scaling `{other}` in GGUF"),
            ))
        }
    };
    let qwen = arch == "qwen2";
    let cfg = Config {
        family: arch.to_string(),
        d_model,
        n_layers: need("block_count")? as usize,
        n_heads,
        n_kv_heads,
        d_head,
        d_mlp: need("feed_forward_length")? as usize,
        d_vocab,
        n_ctx: need("context_length")? as usize,
        norm: Norm::RmsNorm,
        norm_eps: need("attention.layer_norm_rms_epsilon")?,
        pos: Pos::Rotary {
            theta: gguf_num(c, &format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
            scaling,
        },
        mlp: Some(Mlp::Gated { act: Act::Silu }),
        qkv_bias: qwen || c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        attn_out_bias: c.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: false,
        tied_embeddings: !c.tensor_infos.contains_key("output.weight"),
        final_norm: true,
    };
    cfg.validate()
        .map_err(|e| ModelError::bad_file(path, e.to_string()))?;
    Ok(cfg)
}

fn gguf_stored(c: &gguf_file::Content) -> Vec<StoredTensor> {
    let mut v: Vec<StoredTensor> = c
        .tensor_infos
        .iter()
        .map(|(name, info)| StoredTensor {
            name: name.clone(),
            dtype: format!("{:?}", info.ggml_dtype),
            shape: info.shape.dims().to_vec(),
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Random initialisation for models grown from scratch: matrices N(0, 0.02²)-like scaled by
/// fan-in, norm weights 1, biases 0. Each tensor is a trainable [`candle_core::Var`].
pub struct RandomInit {
    vars: HashMap<String, candle_core::Var>,
    seed: u64,
}

impl RandomInit {
    /// A source whose draws depend only on `seed`.
    pub fn new(seed: u64) -> Self {
        RandomInit {
            vars: HashMap::new(),
            seed,
        }
    }

    /// The trainable variables created so far, by canonical name.
    pub fn into_vars(self) -> HashMap<String, candle_core::Var> {
        self.vars
    }
}

impl WeightSource for RandomInit {
    fn get(&mut self, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        // One stream per tensor, so adding a tensor elsewhere does not change this one's values.
        let mut h: u64 = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(h);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with(".b") {
            vec![0.0; n]
        } else if shape.len() == 1 {
            vec![1.0; n] // norm weights
        } else {
            let fan_in = *shape.last().unwrap_or(&1) as f32;
            let std = if name.starts_with("embed") || name.starts_with("pos_embed") {
                0.02
            } else {
                fan_in.powf(-0.5)
            };
            // Box–Muller normal draws.
            (0..n)
                .map(|_| {
                    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
                    let u2: f32 = rng.gen();
                    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect()
        };
        let t = Tensor::from_vec(data, shape, dev)?;
        let var = candle_core::Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(h, 2, dh/2, in).swapaxes(1, 2).reshape(...)
        let (h, dh, inp) = (2usize, 4usize, 3usize);
        let hf = Tensor::arange(0f32, (h * dh * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((h * dh, inp))
            .unwrap();
        let permuted = hf
            .reshape((h, 2, dh / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((h * dh, inp))
            .unwrap();
        let back = unpermute_rotary_rows(&permuted, h).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            hf.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn names_map_per_format() {
        assert_eq!(
            llama_hf_name("blocks.3.attn.q.b"),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(
            llama_hf_name("blocks.0.mlp.in.w"),
            "model.layers.0.mlp.up_proj.weight"
        );
        assert_eq!(gguf_name("blocks.2.mlp.gate.w"), "blk.2.ffn_gate.weight");
        assert_eq!(gguf_name("ln_final.w"), "output_norm.weight");
        assert!(
            matches!(gpt2_name("blocks.1.attn.k.w", ""), Stored::FusedQkv(n, 1) if n == "h.1.attn.c_attn.weight")
        );
        assert!(
            matches!(gpt2_name("blocks.1.mlp.out.w", "transformer."), Stored::Transposed(n) if n == "transformer.h.1.mlp.c_proj.weight")
        );
    }
}
