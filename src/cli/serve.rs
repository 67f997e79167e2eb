//! `harness serve`: the node.

use std::process::ExitCode;

use crate::config::Config;
use crate::node::Node;

pub fn run(config: Config) -> anyhow::Result<ExitCode> {
    // Fail on a missing model setting now, not after the supervisor's restarts.
    config
        .model
        .source(config.serving.task)
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        config.cookie.as_ref().is_some_and(|c| !c.expose().is_empty()),
        "set HARNESS_COOKIE, the shared secret of the mesh: the same value on this node and every client \
         (on Fly: fly secrets set HARNESS_COOKIE=$(openssl rand -hex 32))"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(async move {
        tracing::info!(serving = %config.serving_name, device = %config.device, "starting the harness node");
        let node = Node::start(config).await?;
        anyhow::Ok(node.run_until_signal().await)
    })?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
