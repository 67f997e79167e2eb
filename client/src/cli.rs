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

use crate::{ClientConfig, ClientError, ClientTls, HarnessClient, WireTensor};

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
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
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

/// Whether a ractor_cluster warning only says that a peer closed its session.
pub fn is_normal_session_end(message: &str) -> bool {
    (message.starts_with("Node session") && message.contains("tcp_session_closed"))
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

/// `call`: send one `Run` (`--tensor`) or `Embed` (`--embed`) and print the answer.
#[derive(Debug, Clone, clap::Args)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["tensors", "texts"])),
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

    /// How long to keep trying, in milliseconds (a node that is down is waited
    /// for within it).
    #[arg(long, default_value_t = 30_000)]
    pub deadline_ms: u64,
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

/// Connects a client and runs `work` with it on a runtime of its own.
fn with_client<T, F, Fut>(args: &ClientArgs, work: F) -> Result<T, CliError>
where
    F: FnOnce(HarnessClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let config = args.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = HarnessClient::connect(config).await?;
        Ok(work(client).await?)
    })
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
    if !args.texts.is_empty() {
        let texts = args.texts.clone();
        let embeddings = with_client(&args.client, |client| async move {
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
    let outputs = with_client(&args.client, |client| async move {
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

fn try_status(args: &StatusArgs) -> Result<(), CliError> {
    let deadline = Some(Duration::from_millis(args.deadline_ms));
    let status = with_client(&args.client, |client| async move {
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
    }
}
