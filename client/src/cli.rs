//! The client's command line (feature `cli`): the verbs `call` and `status` of
//! the `harness-client` binary, which the server's `harness call` and `harness
//! status` run too, with the same options. They take only client settings (the
//! nodes, the cookie, the serving's name, TLS, the message limit, the deadline,
//! the log format), each a flag and the environment variable the nodes read.
//!
//! Exit codes: 0 success; [`EXIT_PERMANENT`] (2) for what needs a change before
//! trying again (bad input, a refused cookie, a request too large, not a Harness
//! port, TLS, a usage error); [`EXIT_TEMPORARY`] (75, `EX_TEMPFAIL`) for what
//! may pass by itself (a node unreachable, the deadline passed, no serving ready).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::{
    ChatMessage, ClientConfig, ClientError, ClientTls, GenerateOptions, GenerationEnd,
    GenerationStream, HarnessClient, Prompt, WireTensor,
};

/// The exit code of an error that needs a change before trying again.
pub const EXIT_PERMANENT: u8 = 2;
/// The exit code of an error worth retrying later (`EX_TEMPFAIL`).
pub const EXIT_TEMPORARY: u8 = 75;

/// The log filter of the client verbs when `RUST_LOG` is unset: warnings only,
/// and of ractor_cluster only errors (its warnings are about the mesh's
/// internals, and a failed session is told by the verb's own error).
pub const CLIENT_LOG_FILTER: &str = "warn,ractor_cluster=error";

/// The exit codes, as `--help` tells them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success
  2   a permanent error: fix something first (bad input, the cookie refused,
      a request over the message limit, not a Harness cluster port, TLS, usage)
  75  a temporary error: retry later (no node reachable, the deadline passed,
      no serving ready) (EX_TEMPFAIL)";

/// `HARNESS_LOG_FORMAT`: log lines for people, or JSON for log shippers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event, coloured when stderr is a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global log subscriber on stderr (stdout stays for answers):
/// `RUST_LOG` filters, else `default_filter`; ANSI colour only when stderr is a
/// terminal. A second call keeps the first subscriber.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(|| LogWriter);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(QuietSessionEnds)
        .with(fmt)
        .try_init();
}

/// A way for log lines to stderr: a terminal drawing progress bars prints them
/// above the bars, so that neither tears the other.
pub type LogRoute = Box<dyn Fn(&[u8]) + Send + Sync>;

type SharedRoute = std::sync::Arc<dyn Fn(&[u8]) + Send + Sync>;

static LOG_ROUTE: std::sync::RwLock<Option<SharedRoute>> = std::sync::RwLock::new(None);

/// Sends the log lines of [`init_logging`]'s subscriber through `route`, one
/// whole event per call, instead of straight to stderr; `None` goes back to
/// stderr.
pub fn route_logs(route: Option<LogRoute>) {
    *LOG_ROUTE
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = route.map(SharedRoute::from);
}

/// The log writer: stderr, or the route while one is set. The fmt layer writes
/// each event whole, in one `write_all`.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        // Taken out of the lock before it runs: a route that logs, or a
        // `route_logs` meanwhile, never waits on this lock.
        let route = LOG_ROUTE
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match route {
            Some(route) => {
                route(bytes);
                Ok(bytes.len())
            }
            None => std::io::Write::write(&mut std::io::stderr(), bytes),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut std::io::stderr())
    }
}

/// Drops ractor_cluster's warning for a session that ended normally (the peer
/// closed it: a client leaving), which it logs as `Node session .. exited with
/// 'Some("tcp_session_closed")'` (the node logs such ends itself, at INFO), and its
/// debug lines of the cookie handshake's state (a challenge and its digest).
struct QuietSessionEnds;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QuietSessionEnds {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let meta = event.metadata();
        if !meta.target().starts_with("ractor_cluster") {
            return true;
        }
        let level = *meta.level();
        if level != tracing::Level::WARN && level < tracing::Level::DEBUG {
            return true;
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        !is_normal_session_end(&message.0) && !tells_the_handshake(&message.0)
    }
}

/// Whether a ractor_cluster line shows the cookie handshake's state, which holds
/// its challenge and the digest expected back: never logged, at any level.
pub fn tells_the_handshake(message: &str) -> bool {
    message.contains("auth state")
}

/// Whether a ractor_cluster warning only says that a peer closed its session:
/// the session's end itself, a reset while reading, or the stand-in of one of
/// the peer's actors (a client's caller member) stopping with it, which
/// ractor_cluster calls an unknown child's exit.
pub fn is_normal_session_end(message: &str) -> bool {
    (message.starts_with("Node session") && message.contains("tcp_session_closed"))
        || (message.contains("received an unknown child actor exit event")
            && message.contains("\"remote\""))
        || (message.starts_with("Closing cluster stream after framing error")
            && (message.contains("Connection reset by peer") || message.contains("os error 104")))
}

/// What every client verb needs to reach a serving.
#[derive(Clone, clap::Args)]
pub struct ClientArgs {
    /// A node's cluster address, HOST:PORT (repeat, or comma-separate in
    /// HARNESS_NODES, for several; a name may stand for several machines).
    #[arg(
        long = "node",
        env = "HARNESS_NODES",
        value_delimiter = ',',
        required = true
    )]
    pub nodes: Vec<String>,

    /// The mesh's shared secret, the nodes' HARNESS_COOKIE. Never logged.
    #[arg(long, env = "HARNESS_COOKIE", hide_env_values = true)]
    pub cookie: Option<String>,

    /// The serving to call: its process group is `harness.serving.<name>`.
    #[arg(long, env = "HARNESS_SERVING_NAME", default_value = "default")]
    pub serving_name: String,

    /// TLS: the CA (PEM) the nodes' certificates are checked against. Unset:
    /// plain TCP.
    #[arg(long, env = "HARNESS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// TLS: this client's certificate (PEM), for nodes that require one.
    #[arg(long, env = "HARNESS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS: the private key of `--tls-cert` (PEM).
    #[arg(long, env = "HARNESS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// TLS: the name the nodes' certificates carry. Unset: their IP address.
    #[arg(long, env = "HARNESS_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// The largest message the nodes accept, in bytes (their
    /// HARNESS_MAX_MESSAGE_BYTES); a larger request is refused before sending.
    #[arg(long, env = "HARNESS_MAX_MESSAGE_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(65536..))]
    pub max_message_bytes: u64,

    /// Log lines as `text` or `json` (warnings only unless RUST_LOG says more).
    #[arg(long, env = "HARNESS_LOG_FORMAT", default_value = "text", value_enum)]
    pub log_format: LogFormat,
}

impl std::fmt::Debug for ClientArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientArgs")
            .field("nodes", &self.nodes)
            .field("cookie", &self.cookie.as_ref().map(|_| "[redacted]"))
            .field("serving_name", &self.serving_name)
            .field("tls_ca", &self.tls_ca)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

impl ClientArgs {
    /// The client's settings, or what is missing.
    pub fn config(&self) -> Result<ClientConfig, CliError> {
        let cookie = self
            .cookie
            .as_ref()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                CliError::Usage("set HARNESS_COOKIE (or --cookie) to the node's cookie".to_string())
            })?;
        let mut config = ClientConfig::new(self.nodes.clone(), cookie.clone());
        config.serving = self.serving_name.clone();
        config.max_message_bytes = usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX);
        config.tls = self.tls_ca.as_ref().map(|ca| ClientTls {
            ca: ca.clone(),
            identity: self.tls_cert.clone().zip(self.tls_key.clone()),
            server_name: self.tls_server_name.clone(),
        });
        Ok(config)
    }
}

/// `call`: send one `Run` (`--tensor`), `Embed` (`--embed`) or streamed
/// generation (`--generate`, `--chat`) and print the answer.
#[derive(Debug, Clone, clap::Args)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["tensors", "texts", "prompt", "chat"])),
    group(clap::ArgGroup::new("generation_input").args(["prompt", "chat"])),
    after_help = EXIT_CODES_HELP
)]
pub struct CallArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,

    /// An f32 input tensor as SHAPE:VALUES, e.g. `1,4:0.1,0.2,0.3,0.4` (repeat
    /// for a model with several inputs). Sends a `Run`; prints each output.
    #[arg(long = "tensor")]
    pub tensors: Vec<String>,

    /// A text to embed (repeat for several). Sends an `Embed`; prints one JSON
    /// line per text: text, tokens, truncated, dimension, vector.
    #[arg(long = "embed")]
    pub texts: Vec<String>,

    /// A prompt to continue (a node with HARNESS_TASK=generation). Streams the
    /// generated text to stdout as it is made, then writes on stderr why it
    /// ended, the token counts and the time to the first token. The deadline
    /// covers the whole generation.
    #[arg(long = "generate", value_name = "PROMPT")]
    pub prompt: Option<String>,

    /// A user message to answer, rendered with the model's chat template (a
    /// node with HARNESS_TASK=generation whose model has one). Streams the
    /// answer as --generate does.
    #[arg(long = "chat", value_name = "MESSAGE")]
    pub chat: Option<String>,

    /// With --chat: a system message before the user's.
    #[arg(long, value_name = "TEXT", requires = "chat", conflicts_with_all = ["tensors", "texts", "prompt"])]
    pub system: Option<String>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub generation: GenerateArgs,

    /// How long to keep trying, in milliseconds (a node that is down is waited
    /// for within it).
    #[arg(long, default_value_t = 30_000)]
    pub deadline_ms: u64,

    /// When no serving is ready, start the Fly app's stopped machines
    /// (HARNESS_FLY_APP, FLY_API_TOKEN) and wait for one within the deadline;
    /// what the wake does is printed on stderr.
    #[arg(long)]
    pub wake: bool,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub fly: FlyArgs,
}

/// Where to wake stopped machines: the Fly app, a token, the Machines API.
#[derive(Clone, clap::Args)]
pub struct FlyArgs {
    /// The Fly app whose stopped machines a wake starts.
    #[arg(long, env = "HARNESS_FLY_APP")]
    pub fly_app: Option<String>,

    /// A Fly API token allowed to start the app's machines
    /// (`fly tokens create deploy -a APP`). Never logged.
    #[arg(long, env = "FLY_API_TOKEN", hide_env_values = true)]
    pub fly_api_token: Option<String>,

    /// The Fly Machines API (inside Fly's network: http://_api.internal:4280).
    #[arg(long, env = "FLY_API_HOSTNAME", default_value = crate::wake::DEFAULT_API)]
    pub fly_api_hostname: String,
}

impl std::fmt::Debug for FlyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlyArgs")
            .field("fly_app", &self.fly_app)
            .field(
                "fly_api_token",
                &self.fly_api_token.as_ref().map(|_| "[redacted]"),
            )
            .field("fly_api_hostname", &self.fly_api_hostname)
            .finish()
    }
}

impl FlyArgs {
    /// The wake's settings, or what is missing.
    pub fn config(&self) -> Result<crate::wake::WakeConfig, CliError> {
        let set = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        let (Some(app), Some(token)) = (set(&self.fly_app), set(&self.fly_api_token)) else {
            return Err(CliError::Usage(
                "waking needs HARNESS_FLY_APP (the app) and FLY_API_TOKEN (`fly tokens create deploy -a APP`)".to_string(),
            ));
        };
        let mut config = crate::wake::WakeConfig::new(app, crate::wake::FlyToken::new(token));
        config.api = self.fly_api_hostname.clone();
        Ok(config)
    }
}

/// `wake`: start the Fly app's stopped machines and wait until a serving is
/// ready, printing what happens on stderr and the ready serving's status (JSON)
/// on stdout.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct WakeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub fly: FlyArgs,

    /// How long to wait for a ready serving, in milliseconds (a cold start
    /// downloads nothing again, but loads the model).
    #[arg(long, default_value_t = 600_000)]
    pub deadline_ms: u64,
}

impl CallArgs {
    /// The prompt of `--generate` (a text) or `--chat` (the `--system` message,
    /// if any, then the user's); `None` for the other requests.
    pub fn generation_prompt(&self) -> Option<Prompt> {
        if let Some(prompt) = &self.prompt {
            return Some(Prompt::Text(prompt.clone()));
        }
        let user = self.chat.as_ref()?;
        let system = self.system.iter().map(ChatMessage::system);
        Some(Prompt::Chat(
            system.chain([ChatMessage::user(user.clone())]).collect(),
        ))
    }
}

/// The options of `call --generate` and `call --chat`; refused with `--tensor`
/// or `--embed`. Those not given take the model's `generation_config.json`,
/// then `transformers`' defaults.
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct GenerateArgs {
    /// With --generate or --chat: tokens to generate at most (the prompt not counted).
    #[arg(long, value_name = "N", requires = "generation_input", conflicts_with_all = ["tensors", "texts"],
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_tokens: Option<u32>,

    /// With --generate or --chat: sample, dividing the logits by F (0: greedy).
    #[arg(long, value_name = "F", requires = "generation_input", conflicts_with_all = ["tensors", "texts"],
          value_parser = parse_temperature)]
    pub temperature: Option<f32>,

    /// With --generate or --chat: sample from the smallest set of tokens whose probability
    /// reaches F (0 < F <= 1).
    #[arg(long, value_name = "F", requires = "generation_input", conflicts_with_all = ["tensors", "texts"],
          value_parser = parse_top_p)]
    pub top_p: Option<f32>,

    /// With --generate or --chat: sample among the N most likely tokens only (0: all).
    #[arg(long, value_name = "N", requires = "generation_input", conflicts_with_all = ["tensors", "texts"])]
    pub top_k: Option<u32>,

    /// With --generate or --chat: sample with this seed; the same seed and request give
    /// the same text.
    #[arg(long, value_name = "N", requires = "generation_input", conflicts_with_all = ["tensors", "texts"])]
    pub seed: Option<u64>,

    /// With --generate or --chat: end the generation where TEXT first occurs, leaving it
    /// out of the answer (repeat for several).
    #[arg(long = "stop", value_name = "TEXT", requires = "generation_input", conflicts_with_all = ["tensors", "texts"],
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub stop: Vec<String>,

    /// With --generate or --chat: take the most likely token at each step (no sampling),
    /// whatever the model's generation_config.json says.
    #[arg(long, requires = "generation_input", conflicts_with_all = ["tensors", "texts", "temperature", "top_p", "top_k", "seed"])]
    pub greedy: bool,
}

impl GenerateArgs {
    /// The request's [`GenerateOptions`]: `do_sample` is `false` with
    /// `--greedy`, else unset (sampling when a sampling option is given, else
    /// the model's choice).
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            do_sample: self.greedy.then_some(false),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.clone(),
        }
    }
}

/// `--temperature`: a finite number, 0 or more.
fn parse_temperature(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err("a temperature is a number, 0 or more (0: greedy)".to_string()),
    }
}

/// `--top-p`: a probability above 0, at most 1.
fn parse_top_p(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err("top-p is a probability above 0 and at most 1".to_string()),
    }
}

/// The line `call --generate` and `call --chat` write on stderr after the
/// text: why the generation ended, its token counts, and the time to its first
/// token, e.g.
/// `finish: length (12 prompt tokens, 32 generated, first token after 41 ms)`.
pub fn finish_line(end: &GenerationEnd) -> String {
    let prompt = match end.prompt_tokens {
        1 => "1 prompt token".to_string(),
        n => format!("{n} prompt tokens"),
    };
    let first = if end.generated_tokens == 0 {
        String::new()
    } else {
        format!(", first token after {:.0} ms", end.time_to_first_token_ms)
    };
    format!(
        "finish: {} ({prompt}, {} generated{first})",
        end.finish_reason.as_str(),
        end.generated_tokens
    )
}

/// `status`: print a serving's status as one JSON object.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct StatusArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,

    /// How long to keep trying, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub deadline_ms: u64,
}

/// Why a client verb failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line or a setting is wrong.
    #[error("{0}")]
    Usage(String),
    /// The call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The answer could not be written to stdout.
    #[error("cannot write the answer: {0}")]
    Output(std::io::Error),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

impl CliError {
    /// The process's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Client(err) if err.is_temporary() => EXIT_TEMPORARY,
            _ => EXIT_PERMANENT,
        }
    }
}

/// Runs `call` and returns the exit code, after printing the answer (stdout) or
/// the error (stderr, after `program: error:`).
pub fn call(args: &CallArgs, program: &str) -> ExitCode {
    init_logging(args.client.log_format, CLIENT_LOG_FILTER);
    finish(program, try_call(args))
}

/// Runs `wake` and returns the exit code, as [`call`] does.
pub fn wake(args: &WakeArgs, program: &str) -> ExitCode {
    init_logging(args.client.log_format, CLIENT_LOG_FILTER);
    finish(program, try_wake(args))
}

/// Runs `status` and returns the exit code, as [`call`] does.
pub fn status(args: &StatusArgs, program: &str) -> ExitCode {
    init_logging(args.client.log_format, CLIENT_LOG_FILTER);
    finish(program, try_status(args))
}

fn finish(program: &str, result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{program}: error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Connects a client and runs `work` with it on a runtime of its own; with
/// `wake`, stopped machines are started when no serving is ready, and what the
/// wake does is printed on stderr.
fn with_client<T, E, F, Fut>(
    args: &ClientArgs,
    wake: Option<crate::wake::WakeConfig>,
    work: F,
) -> Result<T, CliError>
where
    F: FnOnce(HarnessClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    CliError: From<E>,
{
    let mut config = args.config()?;
    config.wake = wake;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = HarnessClient::connect(config).await?;
        if let Some(mut events) = client.wake_events() {
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(event) => eprintln!("wake: {event}"),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            });
        }
        Ok(work(client).await?)
    })
}

fn try_wake(args: &WakeArgs) -> Result<(), CliError> {
    let wake = args.fly.config()?;
    let deadline = Duration::from_millis(args.deadline_ms);
    let status = with_client(&args.client, Some(wake), |client| async move {
        client.wake(deadline).await
    })?;
    let json = serde_json::to_string(&status)
        .map_err(|e| CliError::Usage(format!("cannot print the status: {e}")))?;
    println!("{json}");
    Ok(())
}

/// Parses `1,4:0.1,0.2,0.3,0.4` (shape, then the f32 values) into a tensor.
pub fn parse_tensor(text: &str) -> Result<WireTensor, CliError> {
    let usage = |m: String| CliError::Usage(format!("--tensor {text:?}: {m}"));
    let (shape, values) = text
        .split_once(':')
        .ok_or_else(|| usage("a tensor is SHAPE:VALUES, e.g. 1,4:0.1,0.2,0.3,0.4".to_string()))?;
    let shape = shape
        .split(',')
        .map(|d| {
            d.trim()
                .parse::<i64>()
                .map_err(|_| usage(format!("bad dimension {d:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let values = values
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .map_err(|_| usage(format!("bad value {v:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let expected = shape.iter().try_fold(
        1i64,
        |acc, &d| if d < 0 { None } else { acc.checked_mul(d) },
    );
    if expected != Some(values.len() as i64) {
        return Err(usage(format!(
            "shape {shape:?} holds {} values, {} given",
            expected.map_or("too many".to_string(), |e| e.to_string()),
            values.len()
        )));
    }
    Ok(WireTensor::from_f32(&shape, &values))
}

fn try_call(args: &CallArgs) -> Result<(), CliError> {
    let deadline = Some(Duration::from_millis(args.deadline_ms));
    let wake = match args.wake {
        true => Some(args.fly.config()?),
        false => None,
    };
    if let Some(prompt) = args.generation_prompt() {
        let options = args.generation.options();
        let end = with_client(&args.client, wake, |client| async move {
            let stream = client.generate_stream(prompt, options, deadline).await?;
            print_stream(stream, &mut std::io::stdout()).await
        })?;
        if let Some(end) = end {
            eprintln!("{}", finish_line(&end));
        }
        return Ok(());
    }
    if !args.texts.is_empty() {
        let texts = args.texts.clone();
        let embeddings = with_client(&args.client, wake, |client| async move {
            client.embed(texts, deadline).await
        })?;
        // One JSON object per line: readable, and ready for `jq`.
        for (text, embedding) in args.texts.iter().zip(embeddings) {
            let line = serde_json::json!({
                "text": text,
                "tokens": embedding.tokens,
                "truncated": embedding.truncated,
                "dimension": embedding.vector.len(),
                "vector": embedding.vector,
            });
            println!("{line}");
        }
        return Ok(());
    }
    let inputs = args
        .tensors
        .iter()
        .map(|t| parse_tensor(t))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = with_client(&args.client, wake, |client| async move {
        client.run(inputs, deadline).await
    })?;
    for output in outputs {
        match output.to_f32() {
            Some(values) => println!("{:?} {values:?}", output.shape),
            None => println!(
                "{:?} {:?} ({} bytes)",
                output.shape,
                output.dtype,
                output.data.len()
            ),
        }
    }
    Ok(())
}

/// Writes each delta's text to `out` as it comes, flushing after each, then a
/// newline: the text alone on stdout, ready for a pipe (the finish line is for
/// the person, on stderr). Returns the stream's end, or `None` when the reader
/// of `out` went away (a closed pipe: the generation is cancelled as the
/// stream is dropped). After an error, the line of text begun is ended first.
async fn print_stream(
    mut stream: GenerationStream,
    out: &mut impl std::io::Write,
) -> Result<Option<GenerationEnd>, CliError> {
    use futures_core::Stream;
    let mut line_open = false;
    let written = loop {
        let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)).await;
        let delta = match next {
            None => break out.write_all(b"\n").and_then(|()| out.flush()),
            Some(Ok(delta)) => delta,
            Some(Err(err)) => {
                if line_open {
                    let _ = out.write_all(b"\n").and_then(|()| out.flush());
                }
                return Err(err.into());
            }
        };
        if delta.text.is_empty() {
            continue;
        }
        line_open = !delta.text.ends_with('\n');
        if let Err(err) = out
            .write_all(delta.text.as_bytes())
            .and_then(|()| out.flush())
        {
            break Err(err);
        }
    };
    match written {
        Ok(()) => Ok(stream.end().cloned()),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(None),
        Err(err) => Err(CliError::Output(err)),
    }
}

fn try_status(args: &StatusArgs) -> Result<(), CliError> {
    let deadline = Some(Duration::from_millis(args.deadline_ms));
    let status = with_client(&args.client, None, |client| async move {
        client.status(deadline).await
    })?;
    let json = serde_json::to_string(&status)
        .map_err(|e| CliError::Usage(format!("cannot print the status: {e}")))?;
    println!("{json}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_parse_and_bad_ones_say_why() {
        let t = parse_tensor("1,4:0.1,0.2,0.3,0.4").unwrap();
        assert_eq!(t.shape, vec![1, 4]);
        let err = parse_tensor("1,4:0.1").unwrap_err().to_string();
        assert!(err.contains("holds 4 values, 1 given"), "{err}");
        assert!(parse_tensor("0.1,0.2").is_err());
        assert!(parse_tensor("-1,4:0.1").is_err());
    }

    /// `call`'s arguments as a verb parses them (a node given, as it is required).
    fn parse_call(args: &[&str]) -> Result<CallArgs, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Call {
            #[command(flatten)]
            call: CallArgs,
        }
        use clap::Parser;
        let line = ["call", "--node", "127.0.0.1:9000"].iter().chain(args);
        Call::try_parse_from(line).map(|c| c.call)
    }

    #[test]
    fn generate_options_parse_into_the_request() {
        let args = parse_call(&[
            "--generate",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--seed",
            "7",
            "--stop",
            "\n",
            "--stop",
            "THE END",
        ])
        .unwrap();
        assert_eq!(args.prompt.as_deref(), Some("Once upon a time"));
        assert!(args.texts.is_empty() && args.tensors.is_empty());
        assert_eq!(
            args.generation.options(),
            GenerateOptions {
                max_new_tokens: Some(12),
                do_sample: None,
                temperature: Some(0.7),
                top_p: Some(0.9),
                top_k: Some(40),
                seed: Some(7),
                stop: vec!["\n".to_string(), "THE END".to_string()],
            }
        );
        // Nothing given: the model's own configuration decides everything.
        let args = parse_call(&["--generate", "Hi"]).unwrap();
        assert_eq!(args.generation.options(), GenerateOptions::default());
        // --greedy: do_sample false, nothing else.
        let args = parse_call(&["--generate", "Hi", "--greedy", "--max-new-tokens", "3"]).unwrap();
        assert_eq!(
            args.generation.options(),
            GenerateOptions {
                max_new_tokens: Some(3),
                do_sample: Some(false),
                ..GenerateOptions::default()
            }
        );
        // An empty prompt is the model's to judge, not the command line's.
        assert_eq!(
            parse_call(&["--generate", ""]).unwrap().prompt.as_deref(),
            Some("")
        );
    }

    #[test]
    fn chat_parses_into_messages_with_the_same_options() {
        let args =
            parse_call(&["--chat", "Hi there", "--greedy", "--max-new-tokens", "8"]).unwrap();
        assert_eq!(args.prompt, None);
        assert_eq!(
            args.generation_prompt(),
            Some(Prompt::Chat(vec![ChatMessage::user("Hi there")]))
        );
        assert_eq!(
            args.generation.options(),
            GenerateOptions {
                max_new_tokens: Some(8),
                do_sample: Some(false),
                ..GenerateOptions::default()
            }
        );
        let args = parse_call(&[
            "--system",
            "Be brief.",
            "--chat",
            "Why?",
            "--temperature",
            "0.5",
            "--seed",
            "3",
            "--stop",
            "\n",
        ])
        .unwrap();
        assert_eq!(
            args.generation_prompt(),
            Some(Prompt::Chat(vec![
                ChatMessage::system("Be brief."),
                ChatMessage::user("Why?")
            ]))
        );
        let options = args.generation.options();
        assert_eq!(
            (options.temperature, options.seed, options.stop),
            (Some(0.5), Some(3), vec!["\n".to_string()])
        );
        // --generate is a text prompt; the other requests have none.
        let args = parse_call(&["--generate", "Once"]).unwrap();
        assert_eq!(
            args.generation_prompt(),
            Some(Prompt::Text("Once".to_string()))
        );
        let args = parse_call(&["--embed", "hi"]).unwrap();
        assert_eq!(args.generation_prompt(), None);
    }

    #[test]
    fn chat_is_refused_with_generate_and_system_alone() {
        // One generation per call.
        let err = parse_call(&["--generate", "a", "--chat", "b"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{err}"
        );
        let err = parse_call(&["--chat", "b", "--embed", "c"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{err}"
        );
        // --system belongs to a chat.
        let err = parse_call(&["--system", "x"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{err}"
        );
        assert!(err.to_string().contains("--chat"), "{err}");
        for line in [
            &["--generate", "a", "--system", "x"][..],
            &["--embed", "a", "--system", "x"],
            &["--tensor", "1,1:0", "--system", "x"],
        ] {
            let err = parse_call(line).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{line:?}: {err}"
            );
            assert!(err.to_string().contains("--system"), "{line:?}: {err}");
        }
        // The sampling flags with --chat follow the same rules.
        assert!(parse_call(&["--chat", "a", "--greedy", "--seed", "1"]).is_err());
        assert!(parse_call(&["--chat", "a", "--top-p", "0"]).is_err());
    }

    #[test]
    fn generate_options_are_refused_with_embed_and_tensor() {
        for (line, option, input) in [
            (
                &["--embed", "hi", "--max-new-tokens", "5"][..],
                "--max-new-tokens",
                "--embed",
            ),
            (&["--embed", "hi", "--greedy"][..], "--greedy", "--embed"),
            (
                &["--tensor", "1,1:0", "--stop", "x"][..],
                "--stop",
                "--tensor",
            ),
            (
                &["--tensor", "1,1:0", "--temperature", "0.5"][..],
                "--temperature",
                "--tensor",
            ),
            (&["--top-k", "4", "--embed", "hi"][..], "--top-k", "--embed"),
        ] {
            let err = parse_call(line).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{line:?}: {err}"
            );
            let message = err.to_string();
            assert!(
                message.contains(option) && message.contains(input),
                "{line:?}: {message}"
            );
        }
        // Alone, with no input: the verb asks for one.
        let err = parse_call(&["--seed", "1"]).unwrap_err();
        assert!(err.to_string().contains("--generate"), "{err}");
        assert!(err.to_string().contains("--chat"), "{err}");
        // One request per call.
        let err = parse_call(&["--generate", "a", "--embed", "b"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{err}"
        );
    }

    #[test]
    fn bad_generate_values_are_refused() {
        for line in [
            &["--temperature", "-1"][..],
            &["--temperature", "NaN"],
            &["--temperature", "inf"],
            &["--top-p", "0"],
            &["--top-p", "1.5"],
            &["--top-k", "-1"],
            &["--max-new-tokens", "0"],
            &["--seed", "-3"],
            &["--stop", ""],
            &["--greedy", "--temperature", "0.5"],
            &["--greedy", "--seed", "1"],
        ] {
            let mut full = vec!["--generate", "Hi"];
            full.extend_from_slice(line);
            assert!(parse_call(&full).is_err(), "{full:?} was accepted");
        }
        // The edges that are allowed.
        let args = parse_call(&[
            "--generate",
            "Hi",
            "--temperature",
            "0",
            "--top-p",
            "1",
            "--top-k",
            "0",
        ])
        .unwrap();
        let options = args.generation.options();
        assert_eq!(
            (options.temperature, options.top_p, options.top_k),
            (Some(0.0), Some(1.0), Some(0))
        );
    }

    #[test]
    fn the_finish_line_tells_reason_counts_and_first_token() {
        let mut generation = GenerationEnd {
            finish_reason: crate::FinishReason::Length,
            prompt_tokens: 12,
            generated_tokens: 32,
            time_to_first_token_ms: 40.6,
        };
        assert_eq!(
            finish_line(&generation),
            "finish: length (12 prompt tokens, 32 generated, first token after 41 ms)"
        );
        generation.finish_reason = crate::FinishReason::Stop;
        generation.prompt_tokens = 1;
        generation.generated_tokens = 5;
        generation.time_to_first_token_ms = 7.2;
        assert_eq!(
            finish_line(&generation),
            "finish: stop (1 prompt token, 5 generated, first token after 7 ms)"
        );
        // A prompt that fills the context: no first token to time.
        generation.finish_reason = crate::FinishReason::Length;
        generation.prompt_tokens = 4096;
        generation.generated_tokens = 0;
        assert_eq!(
            finish_line(&generation),
            "finish: length (4096 prompt tokens, 0 generated)"
        );
    }

    fn chunk(text: &str, end: bool) -> Result<crate::StreamChunk, ClientError> {
        Ok(crate::StreamChunk {
            delta: crate::GenerationDelta {
                text: text.to_string(),
                token_ids: vec![1; text.len().min(1)],
            },
            end: end.then_some(GenerationEnd {
                finish_reason: crate::FinishReason::Stop,
                prompt_tokens: 2,
                generated_tokens: 3,
                time_to_first_token_ms: 5.0,
            }),
        })
    }

    /// A writer that keeps what it is given and counts its flushes, or fails.
    #[derive(Default)]
    struct Out {
        text: Vec<u8>,
        flushes: usize,
        fail: Option<std::io::ErrorKind>,
    }

    impl std::io::Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            match self.fail {
                Some(kind) => Err(kind.into()),
                None => {
                    self.text.extend_from_slice(buf);
                    Ok(buf.len())
                }
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_stream_prints_each_delta_flushed_then_a_newline_and_its_end() {
        let stream = GenerationStream::scripted(vec![
            chunk("Par", false),
            chunk("", false),
            chunk("is", false),
            chunk(".", true),
        ]);
        let mut out = Out::default();
        let end = print_stream(stream, &mut out).await.unwrap().unwrap();
        assert_eq!(String::from_utf8(out.text).unwrap(), "Paris.\n");
        assert_eq!(out.flushes, 4, "one flush per delta and one at the end");
        assert_eq!(
            finish_line(&end),
            "finish: stop (2 prompt tokens, 3 generated, first token after 5 ms)"
        );
    }

    #[tokio::test]
    async fn an_error_mid_stream_ends_the_line_and_is_returned() {
        let stream = GenerationStream::scripted(vec![
            chunk("Half a", false),
            Err(ClientError::StreamLost {
                reason: "the serving's node went away".to_string(),
            }),
        ]);
        let mut out = Out::default();
        let err = print_stream(stream, &mut out).await.unwrap_err();
        assert_eq!(err.exit_code(), EXIT_TEMPORARY, "{err}");
        assert_eq!(String::from_utf8(out.text).unwrap(), "Half a\n");
        // A line already ended is not ended twice.
        let stream = GenerationStream::scripted(vec![
            chunk("line\n", false),
            Err(ClientError::Serving(crate::ServingError::Model {
                message: "boom".to_string(),
            })),
        ]);
        let mut out = Out::default();
        let err = print_stream(stream, &mut out).await.unwrap_err();
        assert_eq!(err.exit_code(), EXIT_PERMANENT, "{err}");
        assert_eq!(String::from_utf8(out.text).unwrap(), "line\n");
    }

    #[tokio::test]
    async fn a_closed_pipe_stops_quietly_and_other_write_errors_fail() {
        let stream = GenerationStream::scripted(vec![chunk("a", false), chunk("b", true)]);
        let mut out = Out {
            fail: Some(std::io::ErrorKind::BrokenPipe),
            ..Out::default()
        };
        assert!(print_stream(stream, &mut out).await.unwrap().is_none());
        let stream = GenerationStream::scripted(vec![chunk("a", false), chunk("b", true)]);
        let mut out = Out {
            fail: Some(std::io::ErrorKind::StorageFull),
            ..Out::default()
        };
        let err = print_stream(stream, &mut out).await.unwrap_err();
        assert!(matches!(err, CliError::Output(_)), "{err}");
    }

    #[test]
    fn normal_session_ends_are_told_from_other_warnings() {
        assert!(is_normal_session_end(
            "Node session Some(NameMessage { name: \"c\" }) exited with 'Some(\"tcp_session_closed\")'"
        ));
        assert!(!is_normal_session_end(
            "Node session Some(NameMessage { name: \"c\" }) exited with 'Some(\"auth_fail\")'"
        ));
        assert!(!is_normal_session_end(
            "Closing cluster stream after framing error: frame too large"
        ));
        // A client's caller member, stopping as its session ends.
        assert!(is_normal_session_end(
            "NodeSession Some(NameMessage { name: \"harness-client-1@localhost\" }) received an unknown child actor exit event from 0.8 - 'Some(\"remote\")'"
        ));
        assert!(!is_normal_session_end(
            "NodeSession Some(NameMessage { name: \"c\" }) received an unknown child actor exit event from 0.8 - 'Some(\"panicked\")'"
        ));
    }
}
