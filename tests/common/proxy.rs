//! A TCP proxy the tests control, standing between a worker and RabbitMQ so a test can cut the
//! worker's connections without touching the shared broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

pub struct Proxy {
    pub port: u16,
    cut: broadcast::Sender<()>,
    refusing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub async fn start(target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (cut, _) = broadcast::channel(4);
        let refusing = Arc::new(AtomicBool::new(false));
        let (cut_tx, refuse) = (cut.clone(), Arc::clone(&refusing));
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let mut cut = cut_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        Self {
            port,
            cut,
            refusing,
            task,
        }
    }

    /// The AMQP URL that goes through the proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Closes every connection currently open through the proxy.
    pub fn cut(&self) {
        let _ = self.cut.send(());
    }

    /// While true, new connections are closed as soon as they are accepted (broker "down").
    pub fn refuse(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
