//! `DelayedServing`: the actor remote nodes call. It starts at once, answers
//! `NotReady` while it downloads, loads and warms the model (in [`boot`]), joins
//! the process group `harness.serving.<name>` when ready, and hands each request
//! to the batcher. Its phase and counters live in [`ServingShared`], which
//! outlives restarts.

mod boot;
mod caller;
mod request;
mod shared;
mod streams;

use std::sync::Arc;

use harness_client::{serving_group, Fault, Payload, ServingError, ServingMessage};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::watch;

pub use shared::{
    DeviceInfo, FileInfo, InFlight, ModelInfo, Phase, PhaseInfo, Running, ServingShared,
};

use crate::config::Config;

/// The serving actor.
pub struct DelayedServing;

/// What the supervisor starts a serving with.
pub struct ServingArgs {
    pub config: Arc<Config>,
    pub shared: Arc<ServingShared>,
}

/// One life of the serving.
pub struct ServingState {
    config: Arc<Config>,
    shared: Arc<ServingShared>,
    /// The task (and model) of this life, once ready.
    loaded: Arc<boot::Loaded>,
    /// Set (or dropped, on a panic) when this life ends: requests in flight are
    /// then answered `Internal` at once.
    stopped: watch::Sender<bool>,
    boot: Option<AbortOnDrop>,
    /// This life's open streams: dropped with the life (a panic too), which
    /// ends their generations.
    streams: Arc<streams::Streams>,
}

/// Aborts the boot task when this life of the actor ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Actor for DelayedServing {
    type Msg = ServingMessage;
    type State = ServingState;
    type Arguments = ServingArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ServingArgs,
    ) -> Result<ServingState, ActorProcessingErr> {
        // Nothing slow here: a failure in pre_start is not a supervision event.
        args.shared.set_phase(Phase::Starting, None);
        let streams = Arc::default();
        args.shared.set_streams(&streams);
        Ok(ServingState {
            streams,
            config: args.config,
            shared: args.shared,
            loaded: Arc::new(boot::Loaded::default()),
            stopped: watch::channel(false).0,
            boot: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ServingState,
    ) -> Result<(), ActorProcessingErr> {
        let task = boot::run(
            myself,
            state.config.clone(),
            state.shared.clone(),
            state.loaded.clone(),
        );
        state.boot = Some(AbortOnDrop(tokio::spawn(task)));
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: ServingMessage,
        state: &mut ServingState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ServingMessage::Run(payload, port) => request::hand_over(
                payload,
                port,
                state.loaded.get(),
                &state.shared,
                |task, request, timing, respond| task.run(request, timing, respond),
            ),
            ServingMessage::Embed(payload, port) => request::hand_over(
                payload,
                port,
                state.loaded.get(),
                &state.shared,
                |task, request, timing, respond| task.embed(request, timing, respond),
            ),
            ServingMessage::Generate(payload, port) => request::spawn(
                payload,
                port,
                state.loaded.get(),
                &state.shared,
                state.stopped.subscribe(),
                |task, request, timing| {
                    let caller = caller::named(request.caller.as_deref());
                    task.generate(request, timing, caller)
                },
            ),
            ServingMessage::OpenStream(payload, port) => streams::open(
                payload,
                port,
                state.loaded.get(),
                &state.shared,
                state.stopped.subscribe(),
                &state.streams,
                (state.config.serving.max_queue + state.config.serving.generation.max_sequences)
                    as usize,
            ),
            ServingMessage::PullStream(payload, port) => streams::pull(
                payload,
                port,
                &state.shared,
                state.stopped.subscribe(),
                &state.streams,
            ),
            ServingMessage::CancelStream(payload) => {
                streams::cancel(payload, &state.shared, &state.streams)
            }
            ServingMessage::Status(_, port) => {
                let _ = port.send(Payload::new(state.shared.status()));
            }
            ServingMessage::Inject(payload, port) => {
                let fault = payload
                    .0
                    .map_err(|reason| ServingError::BadInput { reason })
                    .and_then(|r| {
                        request::check_version(r.version)?;
                        if state.config.serving.fault_injection {
                            Ok(r.fault)
                        } else {
                            Err(ServingError::BadInput {
                                reason:
                                    "fault injection is off on this node (HARNESS_FAULT_INJECTION)"
                                        .to_string(),
                            })
                        }
                    });
                match fault {
                    Err(err) => {
                        let _ = port.send(Payload::new(Err(err)));
                    }
                    Ok(Fault::PanicNextWarmUp) => {
                        tracing::warn!("the next warm-up will panic (HARNESS_FAULT_INJECTION)");
                        state.shared.panic_next_warm_up();
                        let _ = port.send(Payload::new(Ok(())));
                    }
                    Ok(Fault::Crash) => {
                        let _ = port.send(Payload::new(Ok(())));
                        tracing::warn!("crashing the serving on request (HARNESS_FAULT_INJECTION)");
                        panic!("injected crash (HARNESS_FAULT_INJECTION)");
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ServingState,
    ) -> Result<(), ActorProcessingErr> {
        state.stopped.send_replace(true);
        state.boot.take();
        // This life's streams end with it (their generations with the model).
        state.streams.clear(&state.shared);
        // This life's model goes now, before the supervisor loads the next one.
        state.loaded.release();
        state.shared.set_running(None);
        ractor::pg::leave(serving_group(&state.shared.name), vec![myself.get_cell()]);
        Ok(())
    }
}
