//! A TCP relay between a client and a node that a test can stall or cut, to play
//! a network partition on loopback.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow both ways.
    Flow,
    /// Connections stay open but no byte moves (a black hole).
    Stall,
    /// Every connection is closed and new ones are refused (closed at once).
    Cut,
}

/// The running relay; dropping it stops it.
pub struct Relay {
    pub addr: String,
    link: Arc<watch::Sender<Link>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Relays a free loopback port to `upstream`.
    pub async fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (link, _) = watch::channel(Link::Flow);
        let link = Arc::new(link);
        let upstream = upstream.to_string();
        let shared = link.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *shared.borrow() == Link::Cut {
                    drop(inbound);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (a_read, a_write) = inbound.into_split();
                let (b_read, b_write) = outbound.into_split();
                tokio::spawn(pipe(a_read, b_write, shared.subscribe()));
                tokio::spawn(pipe(b_read, a_write, shared.subscribe()));
            }
        });
        Relay { addr, link, task }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

/// Copies one direction while the link flows; holds while it stalls; ends (and
/// so closes both halves) when it is cut.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let state = *link.borrow_and_update();
        match state {
            Link::Cut => return,
            Link::Stall => {
                if link.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Link::Flow => {}
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // A stall that began during the read holds these bytes too.
                    while *link.borrow() == Link::Stall {
                        if link.changed().await.is_err() {
                            return;
                        }
                    }
                    if *link.borrow() == Link::Cut || to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = link.changed() => {}
        }
    }
}
