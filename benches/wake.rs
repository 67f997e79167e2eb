//! `make bench`, waking: a call to a node that stopped itself when idle
//! (`HARNESS_IDLE_SHUTDOWN_S`), answered after the client started its machine
//! through the Fly Machines API (the test server in `tests/support/fly_api.rs`,
//! which starts a real `harness serve` on the demo model), against the same call
//! on the running node, side by side. The cold start is cut into its phases by
//! the wake's events: the call until the API is asked to start the machine; the
//! machine's start until the API says it runs (here: the node process starts,
//! loads and warms its model until ready); then until the answer (the session to
//! the new node, the call).
//!
//! `HARNESS_BENCH_ROUNDS` (default 5) cold starts.

use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use harness_client::wake::{FlyToken, WakeConfig, WakeEvent};
use harness_client::HarnessClient;
use support::client::{client_config, demo_item};
use support::fly_api::{FlyApi, NodeOnMachine};
use support::measure::{env_or, percentile};

const COOKIE: &str = "bench-cookie";
const APP: &str = "harness-bench";
const TOKEN: &str = "bench-token";

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    percentile(&xs, 0.5)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = env_or("HARNESS_BENCH_ROUNDS", 5).max(1) as usize;
    let api = FlyApi::start(APP, TOKEN).await;
    let node = NodeOnMachine::start(
        &api,
        COOKIE,
        &[
            ("HARNESS_IDLE_SHUTDOWN_S", "1"),
            ("HARNESS_MAX_BATCH_DELAY_MS", "0"),
        ],
    );
    let (machine, cluster) = (node.machine.clone(), node.cluster.clone());
    let mut config = client_config(COOKIE, "default", &[&cluster], Duration::from_secs(120));
    let mut wake = WakeConfig::new(APP, FlyToken::new(TOKEN));
    wake.api = api.url();
    config.wake = Some(wake);
    let client = HarnessClient::connect(config).await.expect("connects");
    let mut events = client.wake_events().unwrap();

    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    let (mut to_start, mut starting, mut after) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        // The same call on the running node (the first after connecting or
        // waking is left out: it opens the session's first call).
        client.run(demo_item(), None).await.expect("warm call");
        let t = Instant::now();
        client.run(demo_item(), None).await.expect("warm call");
        warm.push(t.elapsed());

        // Idle: the node exits by itself, its machine stops.
        while api.state(&machine) != "stopped" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while events.try_recv().is_ok() {}
        let sent = Instant::now();
        client.run(demo_item(), None).await.expect("cold call");
        let answered = sent.elapsed();
        assert!(
            std::iter::from_fn(|| events.try_recv().ok())
                .any(|e| matches!(e, WakeEvent::Started { .. })),
            "the call woke the machine"
        );
        // The phases' times, as the API test server recorded them.
        let (start_req, started_at) = api_times(&api, &machine);
        let start_req = start_req.saturating_duration_since(sent);
        let started_at = started_at.saturating_duration_since(sent);
        cold.push(answered);
        to_start.push(start_req);
        starting.push(started_at.saturating_sub(start_req));
        after.push(answered.saturating_sub(started_at));
        eprintln!(
            "round {round}: warm {:.2?}, cold {answered:.2?} (start asked after {start_req:.2?}, machine started after {started_at:.2?})",
            warm.last().unwrap()
        );
    }
    let cold_m = median(cold.clone());
    let warm_m = median(warm);
    let share = |d: Duration| 100.0 * d.as_secs_f64() / cold_m.as_secs_f64();
    let (a, b, c) = (median(to_start), median(starting), median(after));
    println!("\nCommand: HARNESS_BENCH_ROUNDS={rounds} cargo bench --bench wake\n");
    println!("| call | median of {rounds} |");
    println!("| --- | --- |");
    println!("| on the running node | {warm_m:.2?} |");
    println!("| on the stopped node, woken (call sent → answer) | {cold_m:.2?} |");
    println!(
        "| cold ÷ warm | {:.0}× |\n",
        cold_m.as_secs_f64() / warm_m.as_secs_f64()
    );
    println!("| phase of the cold start | median | share |");
    println!("| --- | --- | --- |");
    println!(
        "| call sent → start asked (no serving found, machines listed) | {a:.2?} | {:.0}% |",
        share(a)
    );
    println!(
        "| start asked → machine started (process start, model load, warm-up, ready) | {b:.2?} | {:.0}% |",
        share(b)
    );
    println!(
        "| machine started → answer (session to the new node, the call) | {c:.2?} | {:.0}% |",
        share(c)
    );
}

/// When the API received the last start of `machine`, and when the machine
/// last became `started`, as the test server recorded them.
fn api_times(api: &FlyApi, machine: &str) -> (Instant, Instant) {
    api.last_start_times(machine)
        .expect("the machine was started")
}
