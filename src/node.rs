//! A Harness node's life: start the supervision tree, run until a signal (or until
//! the supervisor gives up), then drain: stop taking work, leave the group, answer
//! what is queued, stop.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness_client::{serving_group, ServingMessage};
use ractor::{call_t, Actor, ActorRef};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::http::{self, HttpServer, HttpState};
use crate::serving::{Phase, PhaseInfo, ServingShared};
use crate::supervisor::{RootSupervisor, SupervisorArgs, SupervisorMsg};

/// How long a shutdown waits for queued requests before it stops anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running node.
pub struct Node {
    http: HttpServer,
    cluster: Option<crate::cluster::ClusterNode>,
    supervisor: ActorRef<SupervisorMsg>,
    handle: JoinHandle<()>,
    shared: Arc<ServingShared>,
    exit_code: Arc<AtomicI32>,
    idle_shutdown: Option<Duration>,
}

/// A shorter cookie is warned about: it is all that guards the cluster port.
const MIN_COOKIE_CHARS: usize = 16;

impl Node {
    /// Starts the supervisor, which starts the serving. Returns at once: the
    /// serving downloads, loads and warms up in the background.
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        // Settings no restart can fix fail the start (`serve` exits 2), not the
        // supervisor's restarts.
        crate::tasks::tensor::warmup_specs(
            config.serving.warmup_inputs.as_deref(),
            config.serving.max_batch_size,
        )
        .map_err(anyhow::Error::msg)?;
        if let Some(cookie) = &config.cookie {
            let len = cookie.expose().chars().count();
            if len < MIN_COOKIE_CHARS {
                tracing::warn!(
                    "HARNESS_COOKIE is {len} characters: anyone who guesses it can call and crash the model; use at least {MIN_COOKIE_CHARS} random ones (openssl rand -hex 32)"
                );
            }
        }
        let inference = http::Inference::from_config(&config).map_err(anyhow::Error::msg)?;
        if let Some(inference) = &inference {
            let len = inference.key_chars();
            if len < MIN_COOKIE_CHARS {
                tracing::warn!(
                    "HARNESS_API_KEY is {len} characters: anyone who guesses it can use the model over HTTP; use at least {MIN_COOKIE_CHARS} random ones (openssl rand -hex 32)"
                );
            }
        }
        let shared = ServingShared::new(&config.serving_name);
        if config.cookie.is_some() {
            shared.set_max_message_bytes(config.max_message_bytes);
        }
        let exit_code = Arc::new(AtomicI32::new(0));
        // First, so that health checks are answered during a long download.
        let liveness = Arc::new(std::sync::OnceLock::<ActorRef<SupervisorMsg>>::new());
        let live = liveness.clone();
        let http = http::start(
            &config.http_addr,
            HttpState {
                shared: shared.clone(),
                live: Arc::new(move || {
                    live.get()
                        .is_some_and(|s| s.get_status() == ractor::ActorStatus::Running)
                }),
                inference,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("HTTP on HARNESS_HTTP_ADDR={}: {e}", config.http_addr))?;
        // Without a cookie there is no cluster listener (`serve` insists on one;
        // in-process tests and benchmarks need none).
        let cluster = match &config.cookie {
            Some(cookie) => Some(
                crate::cluster::start(crate::cluster::ClusterConfig {
                    addr: &config.cluster_addr,
                    cookie,
                    node_name: &config.node_name,
                    max_message_bytes: config.max_message_bytes,
                    tls: match (&config.tls_cert, &config.tls_key) {
                        (Some(cert), Some(key)) => {
                            Some((cert.as_path(), key.as_path(), config.tls_ca.as_deref()))
                        }
                        _ => None,
                    },
                })
                .await?,
            ),
            None => None,
        };
        let idle_shutdown = config.idle_shutdown_s.map(Duration::from_secs);
        let args = SupervisorArgs {
            config: Arc::new(config),
            shared: shared.clone(),
            exit_code: exit_code.clone(),
        };
        let (supervisor, handle) = Actor::spawn(None, RootSupervisor, args)
            .await
            .map_err(|e| anyhow::anyhow!("starting the supervisor: {e}"))?;
        let _ = liveness.set(supervisor.clone());
        Ok(Node {
            http,
            cluster,
            supervisor,
            handle,
            shared,
            exit_code,
            idle_shutdown,
        })
    }

    /// Where health, status and metrics are served.
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http.local_addr()
    }

    /// The serving's shared state (phase, progress, counters).
    pub fn shared(&self) -> &Arc<ServingShared> {
        &self.shared
    }

    /// The serving actor running now, if any.
    pub async fn serving(&self) -> Option<ActorRef<ServingMessage>> {
        call_t!(self.supervisor, SupervisorMsg::Serving, 5_000)
            .ok()
            .flatten()
    }

    /// Waits until the serving is ready; `Err` with the phase it settled in
    /// instead (`no_gpu`) or was in when `timeout` passed.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), PhaseInfo> {
        let mut phases = self.shared.watch_phase();
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let info = phases.borrow_and_update().clone();
            match info.phase {
                Phase::Ready => return Ok(()),
                Phase::NoGpu | Phase::Draining => return Err(info),
                _ => {}
            }
            if tokio::time::timeout_at(until, phases.changed())
                .await
                .is_err()
            {
                return Err(self.shared.phase());
            }
        }
    }

    /// Serves until SIGTERM or SIGINT, then drains; or until the serving has been
    /// idle for `HARNESS_IDLE_SHUTDOWN_S`, then drains too (exit 0, so the
    /// platform's on-failure policy leaves the machine stopped); or until the
    /// supervisor gives up. Returns the process's exit code.
    pub async fn run_until_signal(mut self) -> i32 {
        let idle = until_idle(self.shared.clone(), self.idle_shutdown);
        tokio::select! {
            () = shutdown_signal() => {
                tracing::info!("shutdown signal received; draining");
                self.shutdown(DRAIN_TIMEOUT).await
            }
            () = idle => {
                self.shutdown(DRAIN_TIMEOUT).await
            }
            _ = &mut self.handle => self.exit_code.load(Ordering::SeqCst),
        }
    }

    /// Stops taking work (`NotReady { draining }`), leaves the process group,
    /// answers everything queued (waiting at most `drain_timeout`), and stops the
    /// tree. Returns the exit code (0 for a clean drain).
    pub async fn shutdown(self, drain_timeout: Duration) -> i32 {
        let started = Instant::now();
        self.shared.begin_draining();
        let serving = call_t!(self.supervisor, SupervisorMsg::Shutdown, 5_000)
            .ok()
            .flatten();
        if let Some(serving) = &serving {
            ractor::pg::leave(serving_group(&self.shared.name), vec![serving.get_cell()]);
        }
        while self.shared.in_flight() > 0 && started.elapsed() < drain_timeout {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.shared.in_flight();
        if left > 0 {
            tracing::warn!(
                left,
                "the drain timed out with {left} request(s) still in flight; stopping anyway (their callers get an error or see the node go away)"
            );
        } else {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "drained: every queued request was answered"
            );
        }
        if let Some(serving) = serving {
            let _ = serving
                .stop_and_wait(Some("shutdown".to_string()), Some(Duration::from_secs(5)))
                .await;
        }
        let _ = self
            .supervisor
            .stop_and_wait(Some("shutdown".to_string()), Some(Duration::from_secs(5)))
            .await;
        let _ = self.handle.await;
        if let Some(cluster) = &self.cluster {
            cluster.server.stop(Some("shutdown".to_string()));
        }
        self.exit_code.load(Ordering::SeqCst)
    }
}

/// Resolves once the serving has been ready with no request for `limit`; never
/// without a limit.
async fn until_idle(shared: Arc<ServingShared>, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    // Checked often enough to stop within a second or so of the limit.
    let every = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        let idle = shared.idle_for();
        if idle >= limit {
            tracing::info!(
                idle_s = idle.as_secs(),
                "no Run, Embed or Generate request for {}s (HARNESS_IDLE_SHUTDOWN_S); draining and exiting so the machine stops",
                idle.as_secs()
            );
            return;
        }
    }
}

/// SIGTERM (the platform stopping the machine) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is nothing to wait for but the end.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
