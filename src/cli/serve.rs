//! `parallelformers serve`: the OpenAI-compatible HTTP server over the parallel model.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Args;
use parallelformers::api::parallelize_resolved;
use parallelformers::options::DEFAULT_PREFIX_CACHE_MIB;
use parallelformers::serve::connections::ConnectionLimits;
use parallelformers::serve::{serve, ServeConfig};
use parallelformers::{PrefillChunk, PrefillOptions};

use super::ModelArgs;

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (loopback unless you mean to expose the server).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 = any free port; the address is printed when ready).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model's name in the API [default: the checkpoint's directory or file name].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most requests waiting or running; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Most new tokens one request may ask for.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Largest request body, in bytes (a larger declared Content-Length is answered 413 before
    /// any of the body is read).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Seconds running requests may go on after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10)]
    grace_seconds: u64,
    /// Most sequences decoded together, and so most choices (`n`) one request may ask for.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Memory the running batch (key/value caches and logits) may take on each rank, in MiB;
    /// requests wait until it has room, and one that could never fit is refused with 400
    /// [default: a quarter of the memory available at start, shared by the ranks].
    #[arg(long)]
    batch_memory_mib: Option<u64>,
    /// Prompt tokens prefilled with each decode step (in the same pass), so that a long
    /// prompt joins the running batch in chunks while the others keep streaming: `auto` takes
    /// as many as add about half a decode step (8 to 512; 512 while nothing else runs), a
    /// number that many.
    #[arg(long, default_value = "auto")]
    prefill_chunk_tokens: PrefillChunk,
    /// Memory of the prefix cache on each rank, in MiB (0: none): keys and values of earlier
    /// prompts and replies, kept by blocks of 16 tokens for later requests that start with the
    /// same tokens (a shared system prompt, the earlier turns of a chat), least recently used
    /// blocks evicted first.
    #[arg(long, default_value_t = DEFAULT_PREFIX_CACHE_MIB)]
    prefix_cache_mb: u64,
    /// Require this key as `Authorization: Bearer <key>` on every /v1/ route (/health and
    /// /metrics stay open).
    #[arg(long, env = "PARALLELFORMERS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most client connections open at once; more are answered 503 and closed. Never more than
    /// the open-file limit (ulimit -n) less 128 descriptors kept for the server.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Seconds a request's head may take to arrive (from the connection's start, or from the
    /// first byte of a later request on a kept-alive connection); the connection closes after.
    #[arg(long, default_value_t = ConnectionLimits::default().header_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_seconds: u64,
    /// Seconds a request's body may take to arrive after its head; 408 after.
    #[arg(long, default_value_t = ConnectionLimits::default().body_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout_seconds: u64,
    /// Seconds a connection with no request in flight stays open for the next request.
    #[arg(long, default_value_t = ConnectionLimits::default().keep_alive.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    keep_alive_seconds: u64,
}

/// Runs `serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let resolved = args.model.resolve()?;
    let path = resolved.location.path();
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        let stem = path.file_stem().or(path.file_name()).unwrap_or_default();
        stem.to_string_lossy().into_owned()
    });
    let options = parallelformers::Options {
        prefill: PrefillOptions {
            chunk: args.prefill_chunk_tokens,
            prefix_cache_bytes: args.prefix_cache_mb.saturating_mul(1 << 20),
        },
        ..args.model.options()
    };
    let model = parallelize_resolved(resolved, options)?;
    let config = ServeConfig {
        address: SocketAddr::new(args.host, args.port),
        model_name: name,
        max_queue: args.max_queue,
        max_tokens_limit: args.max_tokens,
        max_body_bytes: args.max_body_bytes,
        grace: Duration::from_secs(args.grace_seconds),
        api_key: args.api_key.filter(|key| !key.is_empty()),
        max_batch: args.max_batch,
        batch_memory_bytes: args.batch_memory_mib.map(|mib| mib << 20),
        connections: ConnectionLimits {
            max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
            header_timeout: Duration::from_secs(args.header_timeout_seconds),
            body_timeout: Duration::from_secs(args.body_timeout_seconds),
            keep_alive: Duration::from_secs(args.keep_alive_seconds),
        },
    };
    serve(model, config, |address| {
        // The line tells whoever started the server where it listens; the server serves on
        // whether or not anyone still reads it (`| head -1` may have gone, or never come).
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "listening on http://{address}").and_then(|()| out.flush()) {
            tracing::warn!("cannot print the address: {e}");
        }
    })?;
    Ok(())
}
