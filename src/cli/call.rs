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

/// Connects a client to `nodes` and runs `work` with it on a runtime of its own.
fn with_client<T, F, Fut>(config: &Config, nodes: &[String], work: F) -> anyhow::Result<T>
where
    F: FnOnce(HarnessClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, harness_client::ClientError>>,
{
    let client_config = client_config(config, nodes)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = HarnessClient::connect(client_config).await?;
        anyhow::Ok(work(client).await?)
    })
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
    let deadline = Some(Duration::from_millis(deadline_ms));
    let outputs = with_client(config, nodes, |client| async move {
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
    Ok(ExitCode::SUCCESS)
}

fn embed(
    config: &Config,
    nodes: &[String],
    texts: &[String],
    deadline_ms: u64,
) -> anyhow::Result<ExitCode> {
    let deadline = Some(Duration::from_millis(deadline_ms));
    let embeddings = with_client(config, nodes, |client| async move {
        client.embed(texts.to_vec(), deadline).await
    })?;
    // One JSON object per line: readable, and ready for `jq`.
    for (text, embedding) in texts.iter().zip(embeddings) {
        let line = serde_json::json!({
            "text": text,
            "tokens": embedding.tokens,
            "truncated": embedding.truncated,
            "dimension": embedding.vector.len(),
            "vector": embedding.vector,
        });
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(config: &Config, nodes: &[String], deadline_ms: u64) -> anyhow::Result<ExitCode> {
    let deadline = Some(Duration::from_millis(deadline_ms));
    let status = with_client(config, nodes, |client| async move {
        client.status(deadline).await
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
