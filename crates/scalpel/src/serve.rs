//! `scalpel serve`: the web app (prompt explorer, latent dashboards, search, steering
//! playground, patching view) and its JSON API, from this binary with every asset embedded.
//! Listens on loopback unless told otherwise; Ctrl-C stops it cleanly.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use candle_core::Device;
use scalpel_data::harvest;
use scalpel_web::dashboards::DashboardDb;
use scalpel_web::state::{AppState, Limits, LoadedDict};

use crate::model::ModelArgs;
use crate::output::print_json;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A SAELens dictionary folder to encode prompts with, as `PATH` or `ID=PATH` (the id
    /// defaults to the folder's name); repeatable.
    #[arg(long = "dict", value_name = "[ID=]PATH")]
    pub dicts: Vec<String>,
    /// The dashboard database (`scalpel dashboards --out`) whose latent pages to serve.
    #[arg(long, value_name = "DASHBOARDS.db")]
    pub db: Option<PathBuf>,
    /// Address to listen on. Only loopback addresses unless `--public` is given.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 7878)]
    pub port: u16,
    /// Allow a non-loopback `--host`: anyone who can reach it may run the model.
    #[arg(long)]
    pub public: bool,
    /// Secret Neuronpedia's routes require in header `X-SECRET-KEY` (default: env
    /// `SCALPEL_SECRET`; none: the routes are open).
    #[arg(long)]
    pub secret: Option<String>,
    /// Model jobs run at once.
    #[arg(long, default_value_t = Limits::default().workers)]
    pub workers: usize,
    /// Model jobs that may wait beyond those running; more are answered 503.
    #[arg(long, default_value_t = Limits::default().queue)]
    pub queue: usize,
    /// Longest prompt accepted, in tokens.
    #[arg(long, default_value_t = Limits::default().max_prompt_tokens)]
    pub max_prompt_tokens: usize,
    /// Most tokens one generation may ask for.
    #[arg(long, default_value_t = Limits::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let addr = listen_address(&args.host, args.port, args.public)?;
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.max_prompt_tokens == 0 || args.max_new_tokens == 0 {
        bail!("--max-prompt-tokens and --max-new-tokens must be at least 1");
    }
    let secret = args
        .secret
        .clone()
        .or_else(|| std::env::var("SCALPEL_SECRET").ok())
        .filter(|s| !s.is_empty());
    let loaded = args.model.load()?;
    let tokenizer = loaded.tokenizer()?.clone();
    let dicts = load_dicts(&args.dicts, &loaded.model)?;
    let db = match &args.db {
        Some(path) => {
            Some(DashboardDb::open(path).with_context(|| format!("--db {}", path.display()))?)
        }
        None => None,
    };
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        max_prompt_tokens: args.max_prompt_tokens,
        max_new_tokens: args.max_new_tokens,
        workers: args.workers,
        queue: args.queue,
    };
    let n_dicts = dicts.len();
    let state = AppState::new(
        loaded.model,
        tokenizer,
        &args.model.model,
        dicts,
        db,
        limits,
        secret,
    );
    scalpel_web::server::serve_until_ctrl_c(state, addr, |bound| {
        let url = format!("http://{bound}/");
        if json {
            let _ = print_json(&serde_json::json!({ "url": url }));
        } else {
            println!("scalpel serve: {url} ({n_dicts} dictionaries; Ctrl-C stops)");
        }
    })?;
    Ok(())
}

/// The address for `host:port`, refusing one that is not loopback unless `public`.
fn listen_address(host: &str, port: u16, public: bool) -> Result<SocketAddr> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("--host {host}: not an address or a known host name"))?
        .next()
        .with_context(|| format!("--host {host}: resolves to no address"))?;
    if !addr.ip().is_loopback() && !public {
        bail!(
            "--host {host} is not a loopback address: anyone who can reach it could run the \
             model and read the dashboards, and the app has no login. Pass --public to listen \
             there anyway"
        );
    }
    Ok(addr)
}

/// Loads `[ID=]PATH` dictionaries, checking each reads a hook of `model` of its width.
pub(crate) fn load_dicts(
    specs: &[String],
    model: &scalpel_models::transformer::Model,
) -> Result<Vec<LoadedDict>> {
    let mut dicts: Vec<LoadedDict> = Vec::new();
    for spec in specs {
        let (id, path) = match spec.split_once('=') {
            Some((id, path)) if !id.is_empty() => (id.to_string(), PathBuf::from(path)),
            _ => {
                let path = PathBuf::from(spec);
                let id = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| spec.clone());
                (id, path)
            }
        };
        if dicts.iter().any(|d| d.id == id) {
            bail!("--dict: the id `{id}` is given twice (name them with ID=PATH)");
        }
        let sae = scalpel_dict::saelens::load(&path, &Device::Cpu)
            .with_context(|| format!("--dict {spec}"))?;
        let Some(name) = sae.cfg.metadata.hook_name.clone() else {
            bail!("--dict {spec}: the dictionary's config names no hook (metadata.hook_name)");
        };
        let hook = model
            .hook_point(&name)
            .with_context(|| format!("--dict {spec}: its hook `{name}`"))?;
        let width = harvest::hook_width(model, hook)?;
        if width != sae.cfg.d_in {
            bail!(
                "--dict {spec}: d_in is {} but `{hook}` of this model has width {width}",
                sae.cfg.d_in
            );
        }
        let layer = hook.layer().unwrap_or(0);
        dicts.push(LoadedDict {
            id,
            hook,
            layer,
            sae,
        });
    }
    Ok(dicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_public() {
        assert!(listen_address("127.0.0.1", 7878, false).is_ok());
        assert!(listen_address("::1", 0, false).is_ok());
        let err = listen_address("0.0.0.0", 7878, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--public"), "{err}");
        assert!(listen_address("0.0.0.0", 7878, true).is_ok());
        assert!(listen_address("not a host name!", 1, false).is_err());
    }
}
