//! `RootSupervisor`: ours, since ractor has no restart strategies. One-for-one
//! over the serving: when it fails (or ends unasked), it is started again after a
//! backoff of 100 ms doubling to 10 s. More than `HARNESS_MAX_RESTARTS` restarts
//! within `HARNESS_RESTART_WINDOW_S` and the supervisor gives up: it logs why and
//! stops with [`EXIT_TOO_MANY_RESTARTS`], which `harness serve` exits with, so the
//! platform restarts the machine.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness_client::ServingMessage;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::config::Config;
use crate::serving::{DelayedServing, Phase, ServingArgs, ServingShared};

/// The exit code of `harness serve` when the serving failed too often.
pub const EXIT_TOO_MANY_RESTARTS: i32 = 3;

/// The exit code of `harness serve` when the serving failed in a way no restart
/// fixes (a repo or file that does not exist, a file that is not TorchScript):
/// the same as for bad settings found before starting.
pub const EXIT_NO_RESTART_HELPS: i32 = 2;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The root of the supervision tree.
pub struct RootSupervisor;

/// The supervisor's messages (local only).
pub enum SupervisorMsg {
    /// Start (or start again) the serving.
    StartServing,
    /// Stop restarting: the process is shutting down. Answers with the serving's ref.
    Shutdown(RpcReplyPort<Option<ActorRef<ServingMessage>>>),
    /// The current serving, if one runs.
    Serving(RpcReplyPort<Option<ActorRef<ServingMessage>>>),
}

impl ractor::Message for SupervisorMsg {}

pub struct SupervisorArgs {
    pub config: Arc<Config>,
    pub shared: Arc<ServingShared>,
    /// Set to the process's exit code when the supervisor gives up.
    pub exit_code: Arc<AtomicI32>,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    serving: Option<ActorRef<ServingMessage>>,
    /// When each restart in the window happened.
    restarts: VecDeque<Instant>,
    shutting_down: bool,
}

impl Actor for RootSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        myself.send_message(SupervisorMsg::StartServing)?;
        Ok(SupervisorState {
            args,
            serving: None,
            restarts: VecDeque::new(),
            shutting_down: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::StartServing if state.shutting_down || state.serving.is_some() => {}
            SupervisorMsg::StartServing => {
                let args = ServingArgs {
                    config: state.args.config.clone(),
                    shared: state.args.shared.clone(),
                };
                match Actor::spawn_linked(None, DelayedServing, args, myself.get_cell()).await {
                    Ok((serving, _)) => state.serving = Some(serving),
                    // A spawn that fails sends no supervision event: retry it the same way.
                    Err(err) => {
                        restart(&myself, state, format!("the serving did not spawn: {err}"))
                    }
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                state.shutting_down = true;
                let _ = reply.send(state.serving.clone());
            }
            SupervisorMsg::Serving(reply) => {
                let _ = reply.send(state.serving.clone());
            }
        }
        Ok(())
    }

    // ractor's default stops the supervisor when a child ends: never here.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason): (&ActorCell, String) = match &event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("it failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!(
                    "it stopped: {}",
                    reason.as_deref().unwrap_or("no reason given")
                ),
            ),
            _ => return Ok(()),
        };
        let ours = state
            .serving
            .as_ref()
            .is_some_and(|s| s.get_id() == cell.get_id());
        if !ours {
            return Ok(());
        }
        state.serving = None;
        // A panicked life skips post_stop: its engine's counters go here (its
        // model went with the actor's state).
        state.args.shared.set_running(None);
        if state.shutting_down {
            tracing::info!("the serving stopped for shutdown");
            return Ok(());
        }
        if let Some(why) = state.args.shared.take_failure_for_good() {
            tracing::error!(
                "the serving failed and a restart will not help: {why}. Fix the model's files or the settings, then start the node again; exiting with code {EXIT_NO_RESTART_HELPS}"
            );
            give_up(&myself, state, why, EXIT_NO_RESTART_HELPS);
            return Ok(());
        }
        restart(&myself, state, reason);
        Ok(())
    }
}

/// Stops restarting: the serving stays `failed` with `reason`, and `harness serve`
/// exits with `code` once the supervisor has stopped.
fn give_up(myself: &ActorRef<SupervisorMsg>, state: &SupervisorState, reason: String, code: i32) {
    state.args.shared.set_phase(Phase::Failed, Some(reason));
    state.args.exit_code.store(code, Ordering::SeqCst);
    myself.stop(Some(format!("gave up (exit code {code})")));
}

/// Schedules the next start, or gives up when the restarts are too many.
fn restart(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, reason: String) {
    let config = &state.args.config.serving;
    let window = Duration::from_secs(config.restart_window_s);
    let now = Instant::now();
    while state
        .restarts
        .front()
        .is_some_and(|t| now.duration_since(*t) > window)
    {
        state.restarts.pop_front();
    }
    if state.restarts.len() >= config.max_restarts as usize {
        tracing::error!(
            restarts = state.restarts.len(),
            window_s = config.restart_window_s,
            "the serving failed again ({reason}) after {} restarts in {}s (HARNESS_MAX_RESTARTS); giving up with exit code {EXIT_TOO_MANY_RESTARTS} so the machine restarts",
            state.restarts.len(),
            config.restart_window_s
        );
        give_up(myself, state, reason, EXIT_TOO_MANY_RESTARTS);
        return;
    }
    let delay = backoff(state.restarts.len());
    state.restarts.push_back(now);
    let count = state.args.shared.note_restart();
    tracing::warn!(
        restart = count,
        delay_ms = delay.as_millis() as u64,
        "the serving ended ({reason}); restarting it in {delay:?}"
    );
    state
        .args
        .shared
        .set_phase(Phase::Starting, Some(format!("restarting after: {reason}")));
    myself.send_after(delay, || SupervisorMsg::StartServing);
}

/// 100 ms, doubling with each restart in the window, at most 10 s.
pub fn backoff(recent_restarts: usize) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << recent_restarts.min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_to_10s() {
        let steps: Vec<u64> = (0..10).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(
            steps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }
}
