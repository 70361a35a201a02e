//! A TCP proxy the tests control, standing between a Warren process and RabbitMQ so a test can
//! cut connections without touching the shared broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

pub struct Proxy {
    pub port: u16,
    cut: broadcast::Sender<()>,
    refusing: Arc<AtomicBool>,
    cut_after: Arc<AtomicU64>,
    accepts_left: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub async fn start(target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (cut, _) = broadcast::channel(4);
        let refusing = Arc::new(AtomicBool::new(false));
        let cut_after = Arc::new(AtomicU64::new(0));
        let accepts_left = Arc::new(AtomicU64::new(u64::MAX));
        let (cut_tx, refuse, limit) = (cut.clone(), Arc::clone(&refusing), Arc::clone(&cut_after));
        let left = Arc::clone(&accepts_left);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let spent = left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_err();
                if refuse.load(Ordering::SeqCst) || spent {
                    continue; // dropped: the connection is closed at once
                }
                let cut = cut_tx.subscribe();
                tokio::spawn(forward(client, target, cut, Arc::clone(&limit)));
            }
        });
        Self {
            port,
            cut,
            refusing,
            cut_after,
            accepts_left,
            task,
        }
    }

    /// Lets only `n` more connections through; later ones are closed at once.
    pub fn accept_only(&self, n: u64) {
        self.accepts_left.store(n, Ordering::SeqCst);
    }

    /// The AMQP URL that goes through the proxy.
    pub fn url(&self) -> String {
        super::test_vhost_url(self.port)
    }

    /// Closes every connection currently open through the proxy.
    pub fn cut(&self) {
        let _ = self.cut.send(());
    }

    /// While true, new connections are closed as soon as they are accepted (broker "down").
    pub fn refuse(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
    }

    /// Cuts the next connection once it has sent `bytes` towards the broker (once).
    pub fn cut_after_upstream_bytes(&self, bytes: u64) {
        self.cut_after.store(bytes, Ordering::SeqCst);
    }
}

async fn forward(
    client: TcpStream,
    target: &str,
    mut cut: broadcast::Receiver<()>,
    limit: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut sent = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            sent += n as u64;
            let armed = limit.load(Ordering::SeqCst);
            if armed > 0 && sent >= armed && limit.swap(0, Ordering::SeqCst) > 0 {
                return; // mid-stream cut: both sockets close when this task ends
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = tokio::io::copy(&mut server_read, &mut client_write);
    tokio::select! {
        () = upstream => {}
        _ = downstream => {}
        _ = cut.recv() => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
