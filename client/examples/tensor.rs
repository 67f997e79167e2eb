//! An application that runs a tensor model on a harness node: the demo model of
//! `make run-tensor` (`HARNESS_TASK=tensor`, inputs `f32[N, 4]`, outputs `f32[N, 3]`).
//!
//! ```sh
//! HARNESS_NODES=127.0.0.1:9000 HARNESS_COOKIE=dev-cookie-change-me \
//!     cargo run -p harness-client --example tensor
//! ```

use std::time::Duration;

use harness_client::{ClientConfig, HarnessClient, WireTensor};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("HARNESS_NODES").unwrap_or_else(|_| "127.0.0.1:9000".to_string());
    let cookie =
        std::env::var("HARNESS_COOKIE").map_err(|_| "set HARNESS_COOKIE to the node's cookie")?;
    let mut config = ClientConfig::new(nodes.split(',').map(str::to_string).collect(), cookie);
    if let Ok(serving) = std::env::var("HARNESS_SERVING_NAME") {
        config.serving = serving;
    }
    let client = HarnessClient::connect(config).await?;

    // Two items of four features each: one input tensor of shape [2, 4].
    let input = WireTensor::from_f32(&[2, 4], &[0.1, 0.2, 0.3, 0.4, 1.0, 0.0, -1.0, 0.5]);
    let outputs = client
        .run(vec![input], Some(Duration::from_secs(30)))
        .await?;
    let values = outputs[0]
        .to_f32()
        .ok_or("the model answered another dtype than f32")?;
    for (i, item) in values.chunks(outputs[0].shape[1] as usize).enumerate() {
        println!("item {i}: {item:?}");
    }
    Ok(())
}
