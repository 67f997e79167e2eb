//! Every setting, as a flag and an environment variable (the names are docs/ARCHITECTURE.md's
//! public contract). Settings join this type as the features that use them land.

use std::path::{Path, PathBuf};

use crate::device::DevicePolicy;
use crate::fetch::{FetchOptions, FetchSpec, FileSet, FileSpec, Secret};
use crate::logging::LogFormat;

/// The files a tensor model needs when `HARNESS_MODEL_FILES` is unset.
pub const DEFAULT_TENSOR_FILES: &[&str] = &["model.pt"];

/// The settings common to every `harness` command.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Where the model runs: `cuda` (the first GPU; none means the serving is not
    /// started), `cuda:N`, `cpu`, or `auto` (a GPU when there is one, else the CPU).
    #[arg(long, env = "HARNESS_DEVICE", default_value = "cuda", global = true)]
    pub device: DevicePolicy,

    /// The serving's name: its process group is `harness.serving.<name>`.
    #[arg(
        long,
        env = "HARNESS_SERVING_NAME",
        default_value = "default",
        global = true
    )]
    pub serving_name: String,

    /// Log lines as `text` or `json`.
    #[arg(
        long,
        env = "HARNESS_LOG_FORMAT",
        default_value = "text",
        value_enum,
        global = true
    )]
    pub log_format: LogFormat,

    /// Where health, status and metrics are served. `[::]` falls back to
    /// `0.0.0.0` where IPv6 is off.
    #[arg(
        long,
        env = "HARNESS_HTTP_ADDR",
        default_value = "[::]:8080",
        global = true
    )]
    pub http_addr: String,

    /// Turns on the HTTP inference routes (`POST /embed`, `/v1/embeddings`,
    /// `/v1/chat/completions`, `/v1/completions`, `GET /v1/models`) on
    /// `HARNESS_HTTP_ADDR`; callers send `Authorization: Bearer <key>`. Unset,
    /// those routes answer 404. Never logged.
    #[arg(long, env = "HARNESS_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<Secret>,

    /// The deadline of each HTTP inference request, in milliseconds from its
    /// arrival (queued, run and, for a stream, sent).
    #[arg(long, env = "HARNESS_HTTP_DEADLINE_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub http_deadline_ms: u64,

    /// The cluster listener remote nodes call. `[::]` falls back to `0.0.0.0`.
    #[arg(
        long,
        env = "HARNESS_CLUSTER_ADDR",
        default_value = "[::]:9000",
        global = true
    )]
    pub cluster_addr: String,

    /// The mesh's shared secret; `serve` refuses to start without it. Never logged.
    #[arg(long, env = "HARNESS_COOKIE", hide_env_values = true, global = true)]
    pub cookie: Option<Secret>,

    /// This node's name in the cluster.
    #[arg(
        long,
        env = "HARNESS_NODE_NAME",
        default_value = "harness",
        global = true
    )]
    pub node_name: String,

    /// TLS on the cluster port: this node's certificate (PEM). With `--tls-key`;
    /// unset, the port is plain TCP with the cookie.
    #[arg(long, env = "HARNESS_TLS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `--tls-cert` (PEM).
    #[arg(long, env = "HARNESS_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// A CA (PEM): on a node, peers must present a certificate it signed; on a
    /// client (`call`, `status`), the CA the node's certificate is checked against.
    #[arg(long, env = "HARNESS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// The largest cluster message accepted, in bytes (a larger one is refused); at
    /// least 65536, which the handshake and a small request need.
    #[arg(long, env = "HARNESS_MAX_MESSAGE_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(65536..), global = true)]
    pub max_message_bytes: u64,

    /// Exit cleanly (code 0) after this many seconds with no `Run`, `Embed` or `Generate`
    /// request while ready, so an expensive machine stops when unused. Unset: never.
    #[arg(long, env = "HARNESS_IDLE_SHUTDOWN_S", value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub idle_shutdown_s: Option<u64>,

    #[command(flatten)]
    pub model: ModelConfig,

    #[command(flatten)]
    pub serving: ServingConfig,
}

/// Where the model comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelConfig {
    /// The Hub repo, `org/name`.
    #[arg(long, env = "HARNESS_MODEL_REPO", global = true)]
    pub model_repo: Option<String>,

    /// Branch, tag or commit. A pinned commit needs no network once cached.
    #[arg(
        long,
        env = "HARNESS_MODEL_REVISION",
        default_value = "main",
        global = true
    )]
    pub model_revision: String,

    /// Comma-separated files to fetch, exactly these, each required (default by
    /// task: `model.pt`; for `embedding`, `model.pt,tokenizer.json,harness.json`;
    /// for `generation`, the repo as published: config, tokenizer, the generation
    /// config and chat template when there, and the safetensors weights, through
    /// their index when there is one).
    #[arg(
        long,
        env = "HARNESS_MODEL_FILES",
        value_delimiter = ',',
        global = true
    )]
    pub model_files: Vec<String>,

    /// Serve from this local folder instead of the Hub.
    #[arg(long, env = "HARNESS_MODEL_DIR", global = true)]
    pub model_dir: Option<PathBuf>,

    /// The cache root (the Hub layout is under `huggingface/hub`). Default:
    /// `/data/cache` when `/data` is writable (the Fly volume), else the user cache dir.
    #[arg(long, env = "HARNESS_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,

    /// The Hub's base URL (mirrors, tests).
    #[arg(
        long,
        env = "HF_ENDPOINT",
        default_value = "https://huggingface.co",
        global = true
    )]
    pub hf_endpoint: String,

    /// A Hub token for gated or private repos. Never logged.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true, global = true)]
    pub hf_token: Option<Secret>,

    /// Use the cache only; a missing file is an error naming it.
    #[arg(long, env = "HARNESS_OFFLINE", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub offline: bool,

    /// Connections a fetch opens at once: byte ranges of a large file, and
    /// several files. A CDN that limits each connection is this many times faster.
    #[arg(long, env = "HARNESS_DOWNLOAD_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64), global = true)]
    pub download_connections: u32,
}

/// Where the model's files come from, resolved from the settings.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Hub(FetchSpec),
    Dir { dir: PathBuf, files: FileSet },
}

impl ModelConfig {
    /// The files to fetch: exactly `HARNESS_MODEL_FILES`, else the task's own set.
    pub fn files(&self, task: Task) -> FileSet {
        let listed: Vec<String> = self
            .model_files
            .iter()
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty())
            .collect();
        if !listed.is_empty() {
            return FileSet::exact(listed);
        }
        let spec = match task {
            Task::Tensor => FileSpec::only(DEFAULT_TENSOR_FILES),
            Task::Embedding => FileSpec::only(crate::tasks::embedding::DEFAULT_FILES),
            Task::Generation => crate::tasks::generation::DEFAULT_FILES,
        };
        spec.into()
    }

    /// `HARNESS_CACHE_DIR`, or its default.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(default_cache_dir)
    }

    /// The model's source for `task`, or what setting is missing.
    pub fn source(&self, task: Task) -> Result<ModelSource, String> {
        let files = self.files(task);
        if let Some(dir) = &self.model_dir {
            return Ok(ModelSource::Dir {
                dir: dir.clone(),
                files,
            });
        }
        let repo = self
            .model_repo
            .clone()
            .filter(|r| !r.trim().is_empty())
            .ok_or(
            "set HARNESS_MODEL_REPO (a Hub repo, org/name) or HARNESS_MODEL_DIR (a local folder)",
        )?;
        Ok(ModelSource::Hub(FetchSpec {
            repo: repo.trim().to_string(),
            revision: self.model_revision.trim().to_string(),
            files,
            cache_dir: self.cache_dir(),
            endpoint: self.hf_endpoint.clone(),
            token: self.hf_token.clone().filter(|t| !t.expose().is_empty()),
            offline: self.offline,
            options: FetchOptions {
                connections: self.download_connections as usize,
                ..FetchOptions::default()
            },
        }))
    }
}

/// `/data/cache` when `/data` (the Fly volume) is writable, else `$XDG_CACHE_HOME`
/// or `~/.cache`, where Python's Hub cache also lives by default.
pub fn default_cache_dir() -> PathBuf {
    let data = Path::new("/data");
    if is_writable_dir(data) {
        return data.join("cache");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| std::env::temp_dir().join("harness-cache"))
}

fn is_writable_dir(dir: &Path) -> bool {
    if !dir.is_dir() {
        return false;
    }
    let probe = dir.join(format!(".harness-write-check-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// The task the model serves (`HARNESS_TASK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// `Run`: tensors in, tensors out.
    Tensor,
    /// `Embed`: texts in, one vector per text out (a model exported by
    /// `tools/export_torchscript.py`).
    Embedding,
    /// `Generate`: a prompt in, its continuation out (a causal language model's
    /// Hub repo as published: config, tokenizer, safetensors).
    Generation,
}

impl Task {
    /// The name `HARNESS_TASK` gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Tensor => "tensor",
            Task::Embedding => "embedding",
            Task::Generation => "generation",
        }
    }
}

/// The dtype generation weights and KV caches are kept in (`HARNESS_DTYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeChoice {
    /// The checkpoint's `torch_dtype` on a GPU (bf16 where it names none), f32 on the CPU.
    Auto,
    Bf16,
    F16,
    F32,
}

/// The generation task's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerationConfig {
    /// Generation weights' dtype: `auto` (the checkpoint's on a GPU, f32 on the
    /// CPU), `bf16`, `f16` or `f32`.
    #[arg(
        long,
        env = "HARNESS_DTYPE",
        default_value = "auto",
        value_enum,
        global = true
    )]
    pub dtype: DTypeChoice,

    /// Sequences generated at once, each with its KV cache (allocated at load).
    #[arg(long, env = "HARNESS_MAX_SEQUENCES", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096), global = true)]
    pub max_sequences: u32,

    /// Tokens per sequence, prompt and output together. Default: the model's
    /// `max_position_embeddings`, at most 4096.
    #[arg(long, env = "HARNESS_MAX_CONTEXT", value_parser = clap::value_parser!(u32).range(2..), global = true)]
    pub max_context: Option<u32>,
}

/// How the serving batches, restarts and warms up.
#[derive(Debug, Clone, clap::Args)]
pub struct ServingConfig {
    /// What the model does: `tensor` (`Run`: tensors in, tensors out),
    /// `embedding` (`Embed`: texts in, vectors out) or `generation` (`Generate`:
    /// a prompt in, text out).
    #[arg(
        long,
        env = "HARNESS_TASK",
        default_value = "tensor",
        value_enum,
        global = true
    )]
    pub task: Task,

    /// Items per forward.
    #[arg(long, env = "HARNESS_MAX_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536), global = true)]
    pub max_batch_size: u32,

    /// The longest a request waits for others to fill a batch, in milliseconds.
    #[arg(
        long,
        env = "HARNESS_MAX_BATCH_DELAY_MS",
        default_value_t = 5,
        global = true
    )]
    pub max_batch_delay_ms: u64,

    /// Items queued before requests are refused with `Overloaded`.
    #[arg(long, env = "HARNESS_MAX_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_queue: u32,

    /// Restarts allowed within the restart window before the process gives up
    /// (exit code 3) so the platform restarts the machine.
    #[arg(long, env = "HARNESS_MAX_RESTARTS", default_value_t = 5, global = true)]
    pub max_restarts: u32,

    /// The restart window, in seconds.
    #[arg(
        long,
        env = "HARNESS_RESTART_WINDOW_S",
        default_value_t = 60,
        global = true
    )]
    pub restart_window_s: u64,

    /// The per-item inputs to warm up with, e.g. `f32[4]` or `i64[128],i64[128]`:
    /// the model runs on zeros of these shapes (one item, and a full batch) before
    /// it is ready, and requests must bring that many inputs, each of that dtype
    /// and number of dimensions (sizes may differ).
    #[arg(long, env = "HARNESS_WARMUP_INPUTS", global = true)]
    pub warmup_inputs: Option<String>,

    /// Accept fault-injection requests (tests only).
    #[arg(long, env = "HARNESS_FAULT_INJECTION", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub fault_injection: bool,

    /// The generation task's settings.
    #[command(flatten)]
    pub generation: GenerationConfig,
}

impl ServingConfig {
    /// The batcher's settings.
    pub fn batch(&self) -> crate::engine::BatchConfig {
        crate::engine::BatchConfig {
            max_batch_size: self.max_batch_size as usize,
            max_batch_delay: std::time::Duration::from_millis(self.max_batch_delay_ms),
            max_queue: self.max_queue as usize,
        }
    }
}
