//! The smallest application that calls a harness node.
//!
//! ```sh
//! HARNESS_NODES=127.0.0.1:9000 HARNESS_COOKIE=dev-cookie-change-me \
//!     cargo run -p harness-client --example client
//! ```

use std::time::Duration;

use harness_client::{ClientConfig, HarnessClient, WireTensor};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("HARNESS_NODES").unwrap_or_else(|_| "127.0.0.1:9000".to_string());
    let cookie =
        std::env::var("HARNESS_COOKIE").map_err(|_| "set HARNESS_COOKIE to the node's cookie")?;
    let config = ClientConfig::new(nodes.split(',').map(str::to_string).collect(), cookie);
    let client = HarnessClient::connect(config).await?;

    // One item of four features, as the demo model of `make run` takes.
    let input = WireTensor::from_f32(&[1, 4], &[0.1, 0.2, 0.3, 0.4]);
    let outputs = client
        .run(vec![input], Some(Duration::from_secs(10)))
        .await?;
    println!("shape {:?}: {:?}", outputs[0].shape, outputs[0].to_f32());
    Ok(())
}
