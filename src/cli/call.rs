//! `harness call` and `harness status --node`: a client of a remote node, from
//! the command line.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use harness_client::{ClientConfig, HarnessClient, WireTensor};

use crate::config::Config;

fn client_config(config: &Config, nodes: &[String]) -> anyhow::Result<ClientConfig> {
    let cookie = config
        .cookie
        .as_ref()
        .context("set HARNESS_COOKIE to the node's cookie")?;
    let mut client = ClientConfig::new(nodes.to_vec(), cookie.expose());
    client.serving = config.serving_name.clone();
    client.max_message_bytes = config.max_message_bytes as usize;
    client.tls = config.tls_ca.as_ref().map(|ca| harness_client::ClientTls {
        ca: ca.clone(),
        identity: config.tls_cert.clone().zip(config.tls_key.clone()),
        server_name: None,
    });
    Ok(client)
}

/// Parses `1,4:0.1,0.2,0.3,0.4` (shape, then the f32 values) into a tensor.
pub fn parse_tensor(text: &str) -> anyhow::Result<WireTensor> {
    let (shape, values) = text
        .split_once(':')
        .context("a tensor is SHAPE:VALUES, e.g. 1,4:0.1,0.2,0.3,0.4")?;
    let shape = shape
        .split(',')
        .map(|d| {
            d.trim()
                .parse::<i64>()
                .with_context(|| format!("bad dimension {d:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let values = values
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .with_context(|| format!("bad value {v:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let expected: i64 = shape.iter().product();
    anyhow::ensure!(
        expected == values.len() as i64,
        "shape {shape:?} holds {expected} values, {} given",
        values.len()
    );
    Ok(WireTensor::from_f32(&shape, &values))
}

pub fn call(
    config: &Config,
    nodes: &[String],
    tensors: &[String],
    texts: &[String],
    deadline_ms: u64,
) -> anyhow::Result<ExitCode> {
    if !texts.is_empty() {
        return embed(config, nodes, texts, deadline_ms);
    }
    let inputs = tensors
        .iter()
        .map(|t| parse_tensor(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client_config = client_config(config, nodes)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outputs = runtime.block_on(async {
        let client = HarnessClient::connect(client_config).await?;
        anyhow::Ok(
            client
                .run(inputs, Some(Duration::from_millis(deadline_ms)))
                .await?,
        )
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
    Ok(ExitCode::SUCCESS)
}

fn embed(
    config: &Config,
    nodes: &[String],
    texts: &[String],
    deadline_ms: u64,
) -> anyhow::Result<ExitCode> {
    let client_config = client_config(config, nodes)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let vectors = runtime.block_on(async {
        let client = HarnessClient::connect(client_config).await?;
        anyhow::Ok(
            client
                .embed(texts.to_vec(), Some(Duration::from_millis(deadline_ms)))
                .await?,
        )
    })?;
    for (text, vector) in texts.iter().zip(vectors) {
        println!("{text:?}: {vector:?}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(config: &Config, nodes: &[String], deadline_ms: u64) -> anyhow::Result<ExitCode> {
    let client_config = client_config(config, nodes)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        let client = HarnessClient::connect(client_config).await?;
        anyhow::Ok(
            client
                .status(Some(Duration::from_millis(deadline_ms)))
                .await?,
        )
    })?;
    println!(
        "{}",
        serde_json::json!({
            "phase": status.phase,
            "message": status.message,
            "serving": status.serving,
            "device": status.device,
            "queue_depth": status.queue_depth,
            "restarts": status.restarts,
        })
    );
    Ok(ExitCode::SUCCESS)
}
