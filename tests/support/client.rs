//! A [`HarnessClient`] connected to nodes, as an application connects, and the
//! demo model's one-item call.

use std::time::Duration;

use harness_client::{ClientConfig, HarnessClient, WireTensor};

/// Held by each test that runs a `HarnessClient`: ractor's registries (process
/// groups, remote actor ids) are process-wide, and two clients' sessions number
/// their peers alike (each from 0), so one client's peer going away removes
/// the other's servings from the shared groups. One client in a test binary at
/// a time.
pub static ONE_CLIENT_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A client's settings: the serving `serving` on `nodes` (`HOST:PORT` of their
/// cluster listeners), with `cookie`, and `deadline` for calls that give none.
pub fn client_config(
    cookie: &str,
    serving: &str,
    nodes: &[&str],
    deadline: Duration,
) -> ClientConfig {
    let mut config = ClientConfig::new(nodes.iter().map(|n| n.to_string()).collect(), cookie);
    config.serving = serving.to_string();
    config.default_deadline = deadline;
    config
}

/// A client connected with [`client_config`]'s settings; panics if it cannot
/// connect.
pub async fn connect(
    cookie: &str,
    serving: &str,
    nodes: &[&str],
    deadline: Duration,
) -> HarnessClient {
    HarnessClient::connect(client_config(cookie, serving, nodes, deadline))
        .await
        .expect("connects")
}

/// One item for the demo model (and any `f32[4]` model): `[1, 4]` of 0.1, 0.2,
/// 0.3, 0.4.
pub fn demo_item() -> Vec<WireTensor> {
    vec![WireTensor::from_f32(&[1, 4], &[0.1, 0.2, 0.3, 0.4])]
}
