//! What outlives one life of the serving actor: its phase (a watch channel that
//! HTTP and `Status` read), the download progress, the restart count, the running
//! engine's counters and device, and the requests in flight. Nothing here holds
//! the model: the serving's life owns it (see [`super::boot::Loaded`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use harness_client::ServingStatus;
use tokio::sync::watch;

use serde::Serialize;

use crate::engine::{DeviceChoice, EngineStats};
use crate::fetch::FetchProgress;
use crate::metrics::Metrics;

/// The serving's phases (docs/ARCHITECTURE.md), plus `draining` during shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Downloading,
    Loading,
    Warming,
    Ready,
    NoGpu,
    Failed,
    Draining,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Downloading => "downloading",
            Phase::Loading => "loading",
            Phase::Warming => "warming",
            Phase::Ready => "ready",
            Phase::NoGpu => "no_gpu",
            Phase::Failed => "failed",
            Phase::Draining => "draining",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phase and, for `failed` and `no_gpu`, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseInfo {
    pub phase: Phase,
    pub message: Option<String>,
}

/// The model being served, for `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The Hub repo, or the local folder.
    pub repo: String,
    pub revision: String,
    /// The commit the revision resolved to (none for a local folder).
    pub commit: Option<String>,
    pub files: Vec<FileInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
}

/// Where the model runs, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// `cuda:0 NVIDIA H200`, or `cpu`.
    pub name: String,
}

/// The serving's state shared across restarts.
#[derive(Debug)]
pub struct ServingShared {
    pub name: String,
    pub metrics: Arc<Metrics>,
    pub started: std::time::Instant,
    model: Mutex<Option<ModelInfo>>,
    device: Mutex<Option<DeviceInfo>>,
    phase: watch::Sender<PhaseInfo>,
    pub progress: Arc<FetchProgress>,
    restarts: AtomicU64,
    in_flight: AtomicU64,
    /// When a `Run` or `Embed` last arrived or was answered, or the serving last
    /// became ready: what idle shutdown measures from.
    last_activity: Mutex<std::time::Instant>,
    draining: AtomicBool,
    running: Mutex<Option<Running>>,
    /// The cluster port's message limit, told to clients in `Status`.
    max_message_bytes: AtomicU64,
    /// Why the serving failed in a way no restart fixes, for the supervisor.
    for_good: Mutex<Option<String>>,
    /// Fault injection: the next warm-up panics.
    panic_next_warm_up: AtomicBool,
    /// The latest phase changes, oldest first (the watch channel keeps only the last).
    history: Mutex<std::collections::VecDeque<Phase>>,
    /// The streams open on the current life (which owns them: they go with it).
    streams: Mutex<std::sync::Weak<super::streams::Streams>>,
}

/// Phase changes remembered for [`ServingShared::history`].
const HISTORY: usize = 64;

impl ServingShared {
    pub fn new(name: &str) -> Arc<Self> {
        let (phase, _) = watch::channel(PhaseInfo {
            phase: Phase::Starting,
            message: None,
        });
        Arc::new(ServingShared {
            name: name.to_string(),
            metrics: Arc::new(Metrics::default()),
            started: std::time::Instant::now(),
            model: Mutex::new(None),
            device: Mutex::new(None),
            phase,
            progress: Arc::new(FetchProgress::default()),
            restarts: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_activity: Mutex::new(std::time::Instant::now()),
            draining: AtomicBool::new(false),
            running: Mutex::new(None),
            max_message_bytes: AtomicU64::new(0),
            for_good: Mutex::new(None),
            panic_next_warm_up: AtomicBool::new(false),
            history: Mutex::new(std::collections::VecDeque::new()),
            streams: Mutex::default(),
        })
    }

    /// Moves to `phase` (logged). Once draining, the phase stays `draining`.
    pub fn set_phase(&self, phase: Phase, message: Option<String>) {
        if self.is_draining() && phase != Phase::Draining {
            return;
        }
        if let Ok(mut history) = self.history.lock() {
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(phase);
        }
        if phase == Phase::Ready {
            self.touch();
        }
        let why = message.clone();
        self.phase.send_replace(PhaseInfo { phase, message });
        // Logged once it is true: whoever reads "is ready" and asks /health/ready
        // gets 200 (tests/deploy.rs once caught the log ahead of the state).
        match why {
            Some(why) => {
                tracing::info!(serving = %self.name, %phase, "serving {} is {phase}: {why}", self.name)
            }
            None => {
                tracing::info!(serving = %self.name, %phase, "serving {} is {phase}", self.name)
            }
        }
    }

    /// Notes demand: a request arrived or was answered.
    pub fn touch(&self) {
        if let Ok(mut last) = self.last_activity.lock() {
            *last = std::time::Instant::now();
        }
    }

    /// How long the serving has been ready with nothing to do; zero while a
    /// request is in flight or the serving is not ready.
    pub fn idle_for(&self) -> std::time::Duration {
        if self.in_flight() > 0 || self.phase().phase != Phase::Ready {
            return std::time::Duration::ZERO;
        }
        self.last_activity
            .lock()
            .map(|last| last.elapsed())
            .unwrap_or_default()
    }

    /// The latest phase changes, oldest first.
    pub fn history(&self) -> Vec<Phase> {
        self.history
            .lock()
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn phase(&self) -> PhaseInfo {
        self.phase.borrow().clone()
    }

    /// A receiver that sees every phase change.
    pub fn watch_phase(&self) -> watch::Receiver<PhaseInfo> {
        self.phase.subscribe()
    }

    /// Stop taking work: from now on requests are answered `NotReady { draining }`.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.set_phase(Phase::Draining, None);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn note_restart(&self) -> u64 {
        self.restarts.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Counts a request from when it is accepted until it is answered.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn set_model(&self, model: ModelInfo) {
        if let Ok(mut current) = self.model.lock() {
            *current = Some(model);
        }
    }

    pub fn model(&self) -> Option<ModelInfo> {
        self.model.lock().ok().and_then(|m| m.clone())
    }

    pub fn set_device(&self, device: DeviceInfo) {
        if let Ok(mut current) = self.device.lock() {
            *current = Some(device);
        }
    }

    pub fn device(&self) -> Option<DeviceInfo> {
        self.device.lock().ok().and_then(|d| d.clone())
    }

    /// The metrics text, read now.
    pub fn render_metrics(&self) -> String {
        let phase = self.phase().phase;
        self.metrics.render(crate::metrics::Reading {
            phase: phase.as_str(),
            queue_depth: self.queue_depth(),
            restarts: self.restarts(),
            downloaded_bytes: self.progress.downloaded_bytes(),
        })
    }

    /// The cluster port's message limit (`HARNESS_MAX_MESSAGE_BYTES`).
    pub fn set_max_message_bytes(&self, limit: u64) {
        self.max_message_bytes.store(limit, Ordering::Relaxed);
    }

    /// Fault injection: makes the next warm-up panic.
    pub fn panic_next_warm_up(&self) {
        self.panic_next_warm_up.store(true, Ordering::SeqCst);
    }

    /// Whether this warm-up is to panic (once).
    pub fn take_warm_up_panic(&self) -> bool {
        self.panic_next_warm_up.swap(false, Ordering::SeqCst)
    }

    /// The serving failed and a restart will not help (wrong files or settings).
    pub fn fail_for_good(&self, reason: String) {
        if let Ok(mut slot) = self.for_good.lock() {
            *slot = Some(reason);
        }
    }

    /// Takes the reason of a failure no restart fixes, if the serving had one.
    pub fn take_failure_for_good(&self) -> Option<String> {
        self.for_good.lock().ok().and_then(|mut r| r.take())
    }

    /// The ready serving's engine, or none once its life ended.
    pub fn set_running(&self, running: Option<Running>) {
        if let Ok(mut current) = self.running.lock() {
            *current = running;
        }
    }

    /// The running engine's counters (forwards, batched items, queued items).
    pub fn engine_stats(&self) -> Option<Arc<EngineStats>> {
        self.running().map(|r| r.stats)
    }

    fn running(&self) -> Option<Running> {
        self.running.lock().ok().and_then(|r| r.clone())
    }

    /// What a generation serving reports of its slots, memory and streams.
    pub fn generation_status(&self) -> Option<crate::tasks::generation::GenerationStatus> {
        let mut status = self.running()?.task.upgrade()?.generation_status()?;
        if let Some(streams) = self.streams.lock().ok().and_then(|s| s.upgrade()) {
            status.streams_open = streams.count() as u64;
            status.stream_tokens_unpulled = streams.unpulled_tokens() as u64;
        }
        Some(status)
    }

    /// The streams of the life now starting.
    pub fn set_streams(&self, streams: &Arc<super::streams::Streams>) {
        if let Ok(mut current) = self.streams.lock() {
            *current = Arc::downgrade(streams);
        }
    }

    /// Items waiting in the engine's queue.
    pub fn queue_depth(&self) -> u64 {
        self.engine_stats()
            .map_or(0, |s| s.queued_items.load(Ordering::Relaxed))
    }

    /// The `Status` answer.
    pub fn status(&self) -> ServingStatus {
        let info = self.phase();
        ServingStatus {
            phase: info.phase.as_str().to_string(),
            message: info.message,
            serving: self.name.clone(),
            device: self.running().map(|r| r.device.to_string()),
            queue_depth: self.queue_depth(),
            restarts: self.restarts(),
            model: self.model().map(|m| harness_client::StatusModel {
                repo: m.repo,
                revision: m.revision,
                commit: m.commit,
            }),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: harness_client::PROTOCOL_VERSION,
            in_flight: self.in_flight(),
            uptime_s: self.started.elapsed().as_secs(),
            max_message_bytes: self.max_message_bytes.load(Ordering::Relaxed),
        }
    }
}

/// What the serving reads of a ready engine: its counters and where it runs.
#[derive(Clone)]
pub struct Running {
    pub stats: Arc<EngineStats>,
    pub device: DeviceChoice,
    /// The task, for what it reports; weak, so the model's life stays the actor's.
    pub task: std::sync::Weak<dyn crate::tasks::Task>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("device", &self.device)
            .finish()
    }
}

/// A request being handled; dropping it marks the request answered.
pub struct InFlight(Arc<ServingShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
